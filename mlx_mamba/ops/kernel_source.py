"""Scan kernel bodies, written once and rendered for Metal and for CUDA.

One sequential-scan body serves Mamba1 and Mamba2. A "channel" c is a Mamba1 channel d, or a Mamba2
pair (head h, head dim p) with c = h*P + p; D is read per channel, dt, A (Mamba2) and dt_bias
per head h = c / P (Mamba1: P = 1), B and C per group g = h / HPG (Mamba1: G = 1). S lanes (a power of two
<= 32) scan one channel, lane i holding states n = i, i+S, ... (NPL = ceil(N/S) per lane); y is a
shuffle-xor reduction over those S lanes. A thread scans CPT consecutive channels (the forward
kernel; the backward kernel one), so that each B and C value it reads serves CPT channels and,
when those channels share a head, one dt and one exp(dt * A) serve them all. A threadgroup holds
CPG channels (CPG / CPT * S threads) of one batch row, all in one group, and stages TC time steps
of B and C in threadgroup memory between barriers. The backward kernel scans in reverse, chunk by
chunk (TC steps), recomputing each chunk's states from the state the forward kernel saved at the
chunk's start (flag MM_SAVE).

Each backend gets a prelude of macros (shared memory, barrier, shuffle, atomics, math) and a
prologue naming the thread's indices; the helpers and bodies below are common text.
"""

FLAGS = dict(state=1, D=2, z=4, bias=8, softplus=16, limit=32, a_per_n=64, save=128)

FWD_INPUTS = ["u", "dt", "A", "Bm", "Cm", "Dv", "z", "dt_bias", "state", "params", "lims"]
FWD_OUTPUTS = ["y", "last", "ckpt"]
BWD_INPUTS = FWD_INPUTS + ["gy", "glast", "ckpt"]
BWD_OUTPUTS = ["gu", "gdt", "gz", "gA", "gD", "gstate", "gB", "gC"]

_METAL_PRELUDE = """
#define MM_FN inline
#define MM_SHARED threadgroup
#define MM_SYNC() threadgroup_barrier(mem_flags::mem_threadgroup)
#define MM_SHFL_XOR(v, m) simd_shuffle_xor((v), (ushort)(m))
#define MM_EXP(x) metal::exp(x)
#define MM_LOG(x) metal::log(x)
#define MM_ST(p, v) atomic_store_explicit((p), (v), memory_order_relaxed)
#define MM_ADD(p, v) atomic_fetch_add_explicit((p), (v), memory_order_relaxed)
"""
_CUDA_PRELUDE = """
#define MM_FN __device__ inline
#define MM_SHARED __shared__
#define MM_SYNC() __syncthreads()
// Blocks are powers of two: whole warps, or a single partial warp of blockDim.x lanes.
#define MM_SHFL_XOR(v, m) __shfl_xor_sync(blockDim.x >= 32 ? 0xffffffffu : (1u << blockDim.x) - 1u, (v), (m))
#define MM_EXP(x) expf(x)
#define MM_LOG(x) logf(x)
#define MM_ST(p, v) (*(p) = (v))
#define MM_ADD(p, v) atomicAdd((p), (v))
"""
_METAL_PROLOGUE = """
const int tid = int(thread_position_in_threadgroup.x);
const int grp = int(threadgroup_position_in_grid.x), bb = int(threadgroup_position_in_grid.y);
"""
_CUDA_PROLOGUE = """
const int tid = int(threadIdx.x);
const int grp = int(blockIdx.x), bb = int(blockIdx.y);
"""

_HELPERS = """
#define MM_STATE 1
#define MM_D 2
#define MM_Z 4
#define MM_BIAS 8
#define MM_SOFTPLUS 16
#define MM_LIMIT 32
#define MM_A_PER_N 64
#define MM_SAVE 128
MM_FN float mm_log1p(float x) { const float u = 1.0f + x; return u == 1.0f ? x : MM_LOG(u) * (x / (u - 1.0f)); }
MM_FN float mm_sigmoid(float x) { return 1.0f / (1.0f + MM_EXP(-x)); }
// dt = clamp(softplus(raw)) as flagged, and d dt / d raw.
MM_FN float mm_dt(float raw, int f, float lo, float hi) {
  float d = (f & MM_SOFTPLUS) ? (raw > 20.0f ? raw : mm_log1p(MM_EXP(raw))) : raw;
  return (f & MM_LIMIT) ? (d < lo ? lo : (d > hi ? hi : d)) : d;
}
MM_FN float mm_ddt(float raw, int f, float lo, float hi) {
  const float d = mm_dt(raw, f & ~MM_LIMIT, lo, hi);
  if ((f & MM_LIMIT) && (d < lo || d > hi)) return 0.0f;
  return (f & MM_SOFTPLUS) && raw <= 20.0f ? mm_sigmoid(raw) : 1.0f;
}
// Sum over the lanes whose index differs only in the bits lo .. hi/2 (all lanes get the sum).
MM_FN float mm_xor_sum(float v, int lo, int hi) {
  for (int o = lo; o < hi; o <<= 1) v += MM_SHFL_XOR(v, o);
  return v;
}
// The decay exp(d * A) of a state. Mamba1's A is per state: one exponential each. Mamba2's is one
// value per head: the caller computes mm_head_decay once per head and step, and every state reuses it.
MM_FN float mm_head_decay(float d, float a, int f) { return (f & MM_A_PER_N) ? 0.0f : MM_EXP(d * a); }
MM_FN float mm_decay(float d, float a, float head_decay, int f) {
  return (f & MM_A_PER_N) ? MM_EXP(d * a) : head_decay;
}
"""

# Common to both kernels: sizes, this thread's channels, per-channel constants, B/C staging.
_SETUP = """
  // params: L, CH channels, N states, P channels per head, HPG heads per group, G groups, flags
  const int L = params[0], CH = params[1], N = params[2], P = params[3], HPG = params[4], G = params[5];
  const int F = params[6];
  const float lo = lims[0], hi = lims[1];
  constexpr int NP = S * NPL, NT = CPG / CPT * S;  // padded states per channel, threads per group
  // This thread scans lane `lane` of channels c .. c + CPT - 1 (all in group g).
  const int lane = tid % S, c = grp * CPG + tid / S * CPT, head = c / P, g = head / HPG, NH = CH / P;
  const int NC = (L + TC - 1) / TC;  // chunks of TC steps
  MM_SHARED float sB[TC * NP];
  MM_SHARED float sC[TC * NP];
  float a[CPT * NPL], Dc[CPT], bias[CPT];  // [r * NPL + k]: channel c + r, state lane + S * k
  for (int r = 0; r < CPT; ++r) {
    for (int k = 0; k < NPL; ++k) {
      const int n = lane + S * k;
      a[r * NPL + k] = (F & MM_A_PER_N) ? (n < N ? A[(c + r) * N + n] : 0.0f) : A[(c + r) / P];
    }
    Dc[r] = (F & MM_D) ? Dv[c + r] : 0.0f;
    bias[r] = (F & MM_BIAS) ? dt_bias[(c + r) / P] : 0.0f;
  }
"""
_STAGE = """
    MM_SYNC();  // everyone is done with the previous chunk
    for (int i = tid; i < nt * NP; i += NT) {
      const int n = i % NP;
      const long src = (long(bb * L + t0 + i / NP) * G + g) * N + n;
      sB[i] = n < N ? float(Bm[src]) : 0.0f;
      sC[i] = n < N ? float(Cm[src]) : 0.0f;
    }
    MM_SYNC();
"""

FWD_BODY = _SETUP + """
  // u, z (B, L, CH) T; dt (B, L, NH) T; Bm, Cm (B, L, G, N) T; state, last (B, CH, N) f32
  // y (B, L, CH) T; ckpt (B, NC, CH, N) f32: the state before each chunk (with MM_SAVE)
  float h[CPT * NPL];
  for (int r = 0; r < CPT; ++r) {
    for (int k = 0; k < NPL; ++k) {
      const int n = lane + S * k;
      h[r * NPL + k] = (n < N && (F & MM_STATE)) ? state[long(bb * CH + c + r) * N + n] : 0.0f;
    }
  }
  for (int t0 = 0; t0 < L; t0 += TC) {
    const int nt = min(TC, L - t0);
    for (int r = 0; r < CPT; ++r) {
      for (int k = 0; k < NPL; ++k) {
        const int n = lane + S * k;
        if ((F & MM_SAVE) && n < N) ckpt[(long(bb * NC + t0 / TC) * CH + c + r) * N + n] = h[r * NPL + k];
      }
    }
""" + _STAGE + """
    for (int tt = 0; tt < nt; ++tt) {
      const long row = long(bb) * L + t0 + tt;
      float bv[NPL], cv[NPL];  // this step's B and C, read once for all CPT channels
      for (int k = 0; k < NPL; ++k) {
        bv[k] = sB[tt * NP + lane + S * k];
        cv[k] = sC[tt * NP + lane + S * k];
      }
      float d = 0.0f, dA = 0.0f, uv[CPT], acc[CPT];
      for (int r = 0; r < CPT; ++r) {
        const int cr = c + r;
        if (r == 0 || cr % P == 0) {  // a new head: its dt, and its decay when A is per head
          d = mm_dt(float(dt[row * NH + cr / P]) + bias[r], F, lo, hi);
          dA = mm_head_decay(d, a[r * NPL], F);
        }
        uv[r] = float(u[row * CH + cr]);
        acc[r] = 0.0f;
        for (int k = 0; k < NPL; ++k) {
          const int j = r * NPL + k;
          h[j] = mm_decay(d, a[j], dA, F) * h[j] + d * uv[r] * bv[k];
          acc[r] += h[j] * cv[k];
        }
      }
      // Each channel's acc summed over its S lanes in log2(S) + CPT - 1 shuffles, not CPT log2(S):
      // exchanges over the high lane bits halve the channels a lane holds (it keeps half and adds
      // its partner's copy of that half), then a plain xor sum over the S / CPT low lanes.
      for (int m = CPT / 2, o = S / 2; m > 0; m /= 2, o /= 2) {
        const bool upper = (lane & o) != 0;
        for (int i = 0; i < m; ++i) {
          const float kept = upper ? acc[i + m] : acc[i], sent = upper ? acc[i] : acc[i + m];
          acc[i] = kept + MM_SHFL_XOR(sent, o);
        }
      }
      const float sum = mm_xor_sum(acc[0], 1, S / CPT);
      const int r = lane / (S / CPT), cr = c + r;  // the channel whose sum this lane holds
      if (lane % (S / CPT) == 0) {
        float uw = 0.0f, Dw = 0.0f;
        for (int i = 0; i < CPT; ++i) {  // uv[r], Dc[r] without indexing registers at run time
          uw = i == r ? uv[i] : uw;
          Dw = i == r ? Dc[i] : Dw;
        }
        float yv = sum + Dw * uw;
        if (F & MM_Z) {
          const float zv = float(z[row * CH + cr]);
          yv *= zv * mm_sigmoid(zv);
        }
        y[row * CH + cr] = static_cast<T>(yv);
      }
    }
  }
  for (int r = 0; r < CPT; ++r) {
    for (int k = 0; k < NPL; ++k) {
      const int n = lane + S * k;
      if (n < N) last[long(bb * CH + c + r) * N + n] = h[r * NPL + k];
    }
  }
"""

BWD_BODY = _SETUP + """
  // gy (B, L, CH) T; glast (B, CH, N) f32; ckpt as saved by the forward kernel. Outputs f32:
  // gu, gdt, gz (B, L, CH) per channel; gA, gstate (B, CH, N); gD (B, CH); gB, gC (B, L, G, N)
  static_assert(CPT == 1, "the backward kernel scans one channel per thread");
  constexpr int W = NT < 32 ? NT : 32, NSG = NT / W;  // lanes, simdgroups
  MM_SHARED float red[2 * NSG * NP];
  float gh[NPL], gA_acc[NPL], h0[NPL], hs[TC * NPL], cB[NPL], cC[NPL];
  float gD_acc = 0.0f;
  for (int k = 0; k < NPL; ++k) {
    const int n = lane + S * k;
    gh[k] = n < N ? glast[long(bb * CH + c) * N + n] : 0.0f;
    gA_acc[k] = 0.0f;
  }
  for (int j = NC - 1; j >= 0; --j) {
    const int t0 = j * TC, nt = min(TC, L - t0);
""" + _STAGE + """
    for (int k = 0; k < NPL; ++k) {  // this chunk's states, from its checkpoint
      const int n = lane + S * k;
      h0[k] = n < N ? ckpt[(long(bb * NC + j) * CH + c) * N + n] : 0.0f;
    }
    for (int tt = 0; tt < nt; ++tt) {
      const long row = long(bb) * L + t0 + tt;
      const float uv = float(u[row * CH + c]);
      const float d = mm_dt(float(dt[row * NH + head]) + bias[0], F, lo, hi), dA = mm_head_decay(d, a[0], F);
      for (int k = 0; k < NPL; ++k) {
        const float prev = tt > 0 ? hs[(tt - 1) * NPL + k] : h0[k];
        hs[tt * NPL + k] = mm_decay(d, a[k], dA, F) * prev + d * uv * sB[tt * NP + lane + S * k];
      }
    }
    for (int tt = nt - 1; tt >= 0; --tt) {
      const long row = long(bb) * L + t0 + tt;
      const float uv = float(u[row * CH + c]);
      const float raw = float(dt[row * NH + head]) + bias[0], d = mm_dt(raw, F, lo, hi);
      const float dA_head = mm_head_decay(d, a[0], F);
      float gyv = float(gy[row * CH + c]);
      if (F & MM_Z) {  // y before the gate, for d/dz
        float acc = 0.0f;
        for (int k = 0; k < NPL; ++k) acc += hs[tt * NPL + k] * sC[tt * NP + lane + S * k];
        const float yv = mm_xor_sum(acc, 1, S) + Dc[0] * uv;
        const float zv = float(z[row * CH + c]), sg = mm_sigmoid(zv);
        if (lane == 0) MM_ST(&gz[row * CH + c], gyv * yv * sg * (1.0f + zv * (1.0f - sg)));
        gyv *= zv * sg;
      }
      gD_acc += gyv * uv;
      float gd = 0.0f, gx = 0.0f;
      for (int k = 0; k < NPL; ++k) {
        const int i = tt * NP + lane + S * k;
        const float prev = tt > 0 ? hs[(tt - 1) * NPL + k] : h0[k], dA = mm_decay(d, a[k], dA_head, F);
        gh[k] += gyv * sC[i];
        const float ga = gh[k] * prev * dA;  // d loss / d (dt * A)
        gd += ga * a[k] + gh[k] * uv * sB[i];
        gx += gh[k] * d * sB[i];
        gA_acc[k] += ga * d;
        cB[k] = gh[k] * d * uv;
        cC[k] = gyv * hs[tt * NPL + k];
        gh[k] *= dA;
      }
      gd = mm_xor_sum(gd, 1, S);
      gx = mm_xor_sum(gx, 1, S);
      if (lane == 0) {
        MM_ST(&gu[row * CH + c], gx + gyv * Dc[0]);
        MM_ST(&gdt[row * CH + c], gd * mm_ddt(raw, F, lo, hi));
      }
      // B and C are shared by all channels: sum over the simdgroup (shuffles), then over the
      // threadgroup (red), then one atomic add per state and threadgroup.
      for (int k = 0; k < NPL; ++k) {
        const float sb = mm_xor_sum(cB[k], S, W), sc = mm_xor_sum(cC[k], S, W);
        if (tid % 32 < S) {
          red[(tid / 32) * NP + lane + S * k] = sb;
          red[(NSG + tid / 32) * NP + lane + S * k] = sc;
        }
      }
      MM_SYNC();
      for (int n = tid; n < N; n += NT) {
        float sb = 0.0f, sc = 0.0f;
        for (int w = 0; w < NSG; ++w) {
          sb += red[w * NP + n];
          sc += red[(NSG + w) * NP + n];
        }
        MM_ADD(&gB[(row * G + g) * N + n], sb);
        MM_ADD(&gC[(row * G + g) * N + n], sc);
      }
      MM_SYNC();  // red is rewritten at the next step
    }
  }
  for (int k = 0; k < NPL; ++k) {
    const int n = lane + S * k;
    if (n < N) {
      MM_ST(&gA[long(bb * CH + c) * N + n], gA_acc[k]);
      MM_ST(&gstate[long(bb * CH + c) * N + n], gh[k]);
    }
  }
  if (lane == 0) MM_ST(&gD[bb * CH + c], gD_acc);
"""

BODIES = {"fwd": FWD_BODY, "bwd": BWD_BODY}


def render(backend, kind):
    """(header, source) of kernel `kind` ("fwd" or "bwd") for `backend` ("metal" or "cuda")."""
    prelude, prologue = {"metal": (_METAL_PRELUDE, _METAL_PROLOGUE),
                         "cuda": (_CUDA_PRELUDE, _CUDA_PROLOGUE)}[backend]
    return prelude + _HELPERS, prologue + BODIES[kind]
