"""The Metal and CUDA scan kernels, run on the CPU by the emulator in tests/metal_emulator.

Every op goes through the public dispatch with backend="metal" or "cuda"; the package builds its
kernels with mx.fast.metal_kernel / mx.fast.cuda_kernel, which the harness replaces with emulated
kernels that compile the exact text MLX would compile. Float32 results must match the pure-MLX
reference and the float64 loops to 1e-5 of the result's scale (max |ref|, at least 1).
"""
import math

import mlx.core as mx
import numpy as np
import pytest

import float64_reference as f64
from comparing import assert_close
from kernel_texts import plant
from metal_emulator import harness
from mlx_mamba import Mamba1, Mamba2, ops
from mlx_mamba.ops import kernel_ops, kernel_source

pytestmark = pytest.mark.skipif(harness.compiler() is None,
                                reason="g++ is missing: the kernel emulator compiles kernels with it")
needs_race_detector = pytest.mark.skipif(not harness.RACE_DETECTOR,
                                         reason="the race detector needs Linux (ELF thread-local storage)")
TOL = 1e-5


@pytest.fixture(params=["metal", "cuda"])
def backend(request, monkeypatch):
    harness.install(monkeypatch)
    kernel_ops._kernel.cache_clear()
    yield request.param
    kernel_ops._kernel.cache_clear()


def close(ours, theirs, tol=TOL):
    """Each array within `tol` of the result's scale (max |ref|, at least 1); NaN or Inf fails."""
    return assert_close(ours, theirs, tol, floor=1.0)


def f64_of(x):
    return None if x is None else np.array(x.astype(mx.float32), np.float64)


def mamba1_inputs(b, L, D, N, dtype=mx.float32, options=True):
    # u, delta, z (b, L, D); A (D, N); B, C (b, L, N); D, bias (D,); state (b, D, N)
    mx.random.seed(1)
    r = lambda *s: mx.random.normal(s)  # noqa: E731
    x = dict(u=r(b, L, D), delta=r(b, L, D) * 0.5, A=-mx.exp(r(D, N)), B=r(b, L, N), C=r(b, L, N))
    if not options:
        x["delta"] = mx.abs(x["delta"])
        return {k: v.astype(dtype) if k != "A" else v for k, v in x.items()}
    x.update(D=r(D), z=r(b, L, D), delta_bias=r(D) * 0.1, delta_softplus=True, state=r(b, D, N))
    return {k: v.astype(dtype) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}


def mamba2_inputs(b, L, H, P, G, N, options=True, dt_limit=(0.0, math.inf)):
    # x, z (b, L, H, P); dt (b, L, H); A, D, dt_bias (H,); B, C (b, L, G, N); states (b, H, P, N)
    mx.random.seed(2)
    r = lambda *s: mx.random.normal(s)  # noqa: E731
    x = dict(x=r(b, L, H, P), dt=mx.abs(r(b, L, H)) * 0.5, A=-mx.exp(r(H)), B=r(b, L, G, N),
             C=r(b, L, G, N), dt_limit=dt_limit)
    if options:
        x.update(D=r(H), z=r(b, L, H, P), dt_bias=r(H) * 0.1, dt_softplus=True,
                 initial_states=r(b, H, P, N))
    return x


M1 = dict(b=2, L=37, D=12, N=12)  # N: 16 lanes, 12 used; 4 channels (2 simdgroups) a threadgroup
M2 = dict(b=2, L=71, H=8, P=5, G=2, N=12)  # two chunks of 64 steps; 2 groups of 4 heads
M2_WIDE = dict(b=1, L=37, H=4, P=3, G=2, N=40)  # 2 states a lane, chunks of 16 steps
M2_CPT = dict(b=2, L=37, H=6, P=4, G=3, N=24)  # forward: 4 channels (one head) a thread; chunks of 32
M2_P1 = dict(b=1, L=37, H=8, P=1, G=2, N=12)  # heads of one channel: 4 heads a thread
M2_N2 = dict(b=2, L=9, H=4, P=2, G=1, N=2)  # 2 lanes a channel, 2 channels a thread: one lane each


@pytest.mark.parametrize("options", [True, False])
def test_selective_scan(backend, options):
    # Without options: 5 channels, so a threadgroup is one channel of 16 lanes (a partial simdgroup).
    x = mamba1_inputs(**(M1 if options else dict(M1, D=5)), options=options)
    y, last = ops.selective_scan(**x, return_last_state=True, backend=backend)
    y_ref, last_ref = ops.selective_scan(**x, return_last_state=True, backend="reference")
    y64, last64 = f64.selective_scan(**{k: f64_of(v) if k != "delta_softplus" else v for k, v in x.items()})
    assert y.dtype == mx.float32 and last.dtype == mx.float32
    close(dict(y=y, last=last, y_vs_f64=y, last_vs_f64=last),
          dict(y=y_ref, last=last_ref, y_vs_f64=y64, last_vs_f64=last64))


def with_D_per_head_dim(x):
    """Mamba2 inputs with D of shape (H, P), as mamba_ssm allows, in place of (H,)."""
    return dict(x, D=mx.random.normal(x["x"].shape[2:]))


@pytest.mark.parametrize("shape, options, dt_limit, D_per_head_dim", [
    (M2, True, (0.05, 1.5), False), (M2_WIDE, False, (0.0, math.inf), False),
    (M2, True, (0.0, math.inf), True), (M2_CPT, True, (0.05, 1.5), False), (M2_P1, True, (0.0, math.inf), False),
    (M2_N2, True, (0.0, math.inf), False)],
    ids=["groups-limit", "wide-N", "D-per-head-dim", "4-channels-a-thread", "1-channel-heads", "N-2"])
def test_ssd(backend, shape, options, dt_limit, D_per_head_dim):
    x = mamba2_inputs(**shape, options=options, dt_limit=dt_limit)
    if D_per_head_dim:
        x = with_D_per_head_dim(x)
    y, last = ops.ssd(**x, chunk_size=16, return_final_states=True, backend=backend)
    y_ref, last_ref = ops.ssd(**x, chunk_size=16, return_final_states=True, backend="reference")
    y64, last64 = f64.ssd(**{k: f64_of(v) if isinstance(v, mx.array) else v for k, v in x.items()})
    close(dict(y=y, last=last, y_vs_f64=y, last_vs_f64=last),
          dict(y=y_ref, last=last_ref, y_vs_f64=y64, last_vs_f64=last64))
    assert y.shape == x["x"].shape and last.shape == (shape["b"], shape["H"], shape["P"], shape["N"])


def test_steps(backend):
    x = mamba1_inputs(**M1)
    args = dict(state=x["state"], u=x["u"][:, 0], delta=x["delta"][:, 0], A=x["A"], B=x["B"][:, 0],
                C=x["C"][:, 0], D=x["D"], z=x["z"][:, 0], delta_bias=x["delta_bias"], delta_softplus=True)
    got = ops.selective_scan_step(**args, backend=backend)
    ref = ops.selective_scan_step(**args, backend="reference")
    close(dict(zip(("y", "state"), got)), dict(zip(("y", "state"), ref)))
    x = mamba2_inputs(**M2, dt_limit=(0.05, 1.5))
    for D in (x["D"], with_D_per_head_dim(x)["D"]):
        args = dict(state=x["initial_states"], x=x["x"][:, 0], dt=x["dt"][:, 0], A=x["A"],
                    B=x["B"][:, 0], C=x["C"][:, 0], D=D, z=x["z"][:, 0], dt_bias=x["dt_bias"],
                    dt_softplus=True, dt_limit=x["dt_limit"])
        got = ops.ssd_step(**args, backend=backend)
        ref = ops.ssd_step(**args, backend="reference")
        close(dict(zip(("y", "state"), got)), dict(zip(("y", "state"), ref)))


@pytest.mark.parametrize("block", ["mamba1", "mamba2"])
def test_left_padding_over_a_cache(backend, monkeypatch, block):
    """The mixers' masked path (Δ = 0 on padding, computed outside the kernel) is exact here too."""
    monkeypatch.setenv("MLX_MAMBA_BACKEND", backend)
    mx.random.seed(4)
    mixer = (Mamba1(16, d_state=4, dt_rank=2) if block == "mamba1"
             else Mamba2(16, d_state=4, head_dim=8, n_groups=2, chunk_size=4))
    history, x = mx.random.normal((2, 3, 16)), mx.random.normal((2, 6, 16))
    pads = 5  # more than the conv window; what the padded positions hold must not matter
    cache, alone = mixer.make_cache(2), mixer.make_cache(1)
    mixer(history, cache)
    mixer(history[1:], alone)
    y = mixer(x, cache, mask=mx.array([[1] * 6, [0] * pads + [1] * (6 - pads)]))
    y_alone = mixer(x[1:, pads:], alone)
    close(dict(y=y[1, pads:], ssm=cache.ssm[1], conv=cache.conv[1]),
          dict(y=y_alone[0], ssm=alone.ssm[0], conv=alone.conv[0]))


def _grads(fn, inputs, names, weights):
    def loss(*arrays):
        y, last = fn(**dict(zip(names, arrays)))
        return (y * weights[0]).sum() + (last * weights[1]).sum()
    return mx.grad(loss, argnums=tuple(range(len(names))))(*(inputs[k] for k in names))


@pytest.mark.parametrize("model", ["mamba1", "mamba2", "mamba2-D-per-head-dim", "mamba2-4-channels-a-thread"])
def test_gradients(backend, model):
    if model == "mamba1":
        x = mamba1_inputs(**M1)
        names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state"]
        run = lambda be: lambda **a: ops.selective_scan(  # noqa: E731
            **a, delta_softplus=True, return_last_state=True, backend=be)
        shapes = [(M1["b"], M1["L"], M1["D"]), (M1["b"], M1["D"], M1["N"])]
    else:
        s = M2_CPT if model == "mamba2-4-channels-a-thread" else M2
        x = mamba2_inputs(**s, dt_limit=(0.05, 1.5))
        if model == "mamba2-D-per-head-dim":
            x = with_D_per_head_dim(x)
        names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
        run = lambda be: lambda **a: ops.ssd(  # noqa: E731
            **a, chunk_size=16, dt_softplus=True, dt_limit=(0.05, 1.5), return_final_states=True, backend=be)
        shapes = [(s["b"], s["L"], s["H"], s["P"]), (s["b"], s["H"], s["P"], s["N"])]
    mx.random.seed(3)
    weights = [mx.random.normal(sh) for sh in shapes]
    got = _grads(run(backend), x, names, weights)
    ref = _grads(run("reference"), x, names, weights)
    close({"d" + n: g for n, g in zip(names, got)}, {"d" + n: r for n, r in zip(names, ref)})


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_inputs(backend, dtype):
    if dtype == mx.bfloat16 and backend == "cuda":
        pytest.skip("bfloat16 runs the same body as float16: checked on Metal only, to save time")
    x = mamba1_inputs(**M1, dtype=dtype)
    y, last = ops.selective_scan(**x, return_last_state=True, backend=backend)
    y64, last64 = f64.selective_scan(**{k: f64_of(v) if k != "delta_softplus" else v for k, v in x.items()})
    assert y.dtype == dtype and last.dtype == mx.float32
    # The inputs are exact in float64; only y's final rounding and float32 accumulation differ.
    close(y, y64, 4e-3 if dtype == mx.float16 else 2e-2)
    close(last, last64, 1e-5)


def test_kernels_built_once(backend):
    harness.BUILT.clear()
    x = mamba1_inputs(**M1)
    for _ in range(2):
        ops.selective_scan(**x, backend=backend)
        _grads(lambda **a: ops.selective_scan(**a, return_last_state=True, backend=backend),
               x, ["u", "delta", "A", "B", "C"], [mx.ones((2, 37, 12)), mx.ones((2, 12, 12))])
    built = [b for b in harness.BUILT if b[0] == backend]
    assert len(built) == len(set(built)) == 2


def test_import_builds_nothing():
    import importlib
    kernel_ops._kernel.cache_clear()
    for name in ("metal", "cuda"):
        importlib.import_module(f"mlx_mamba.ops.{name}")
    assert kernel_ops._kernel.cache_info().currsize == 0


def test_launch_matches_mlx_conventions(backend):
    """The text built from what the package passed carries MLX's signature for that backend."""
    ops.selective_scan(**mamba1_inputs(**M1), backend=backend)
    launch = harness.LAUNCHES[-1]
    # 12 channels of 16 lanes, 4 channels a thread: threadgroups of 4 channels, 16 threads
    assert launch["grid"] == (M1["D"] // 4 * 16, M1["b"], 1) and launch["threadgroup"] == (16, 1, 1)
    if backend == "metal":
        assert "[[kernel]] void custom_kernel_mlx_mamba_scan_fwd__float_16_1_4_4_64_float_" in launch["text"]
        assert "const constant int32_t* params [[buffer(9)]]" in launch["text"]
        assert "uint3 thread_position_in_threadgroup [[thread_position_in_threadgroup]]" in launch["text"]
    else:
        assert "__global__ void custom_kernel_mlx_mamba_scan_fwd_float_16_1_4_4_64(" in launch["text"]
        assert "  using T = float;\n  constexpr int S = 16;" in launch["text"]


# Mutants of the kernel bodies that the harness must catch: it is only worth what it detects.
# name: (body changed, text, its replacement, the race message expected; None: wrong results).
# They run forward only, except those of the backward kernel and the checkpoints (gradients).
RACE = r"data race \((read after write|write after read|write after write)\) on threadgroup array '{}'\[\d+\]: " \
       r"thread \d+ of threadgroup \(\d+,\d+,\d+\) .*, then thread \d+ of threadgroup \(\d+,\d+,\d+\) "
MUTANTS = {
    "no barrier after staging": ("fwd", "      sC[i] = n < N ? float(Cm[src]) : 0.0f;\n    }\n    MM_SYNC();\n",
                                 "      sC[i] = n < N ? float(Cm[src]) : 0.0f;\n    }\n", RACE.format("s[BC]")),
    "no barrier before staging": ("fwd", "    MM_SYNC();  // everyone is done with the previous chunk\n", "",
                                  RACE.format("s[BC]")),
    "no barrier before red is read": ("bwd", "      MM_SYNC();\n      for (int n = tid; n < N; n += NT) {",
                                      "      for (int n = tid; n < N; n += NT) {", RACE.format("red")),
    "no barrier before red is rewritten": ("bwd", "      MM_SYNC();  // red is rewritten at the next step\n", "",
                                           RACE.format("red")),
    "short lane reduction": ("fwd", "sum = mm_xor_sum(acc[0], 1, S / CPT);", "sum = mm_xor_sum(acc[0], 2, S / CPT);",
                             None),
    "wrong group of a head": ("fwd", "g = head / HPG", "g = head % G", None),
    "an output never written": ("fwd", "if (lane % (S / CPT) == 0) {", "if (lane % (S / CPT) == 0 && cr > 0) {",
                                None),
    "a write past the end": ("fwd", "y[row * CH + cr] =", "y[row * CH + cr + 1] =", None),
    "checkpoint off by a chunk": ("fwd", "ckpt[(long(bb * NC + t0 / TC)", "ckpt[(long(bb * NC + (t0 / TC + 1) % NC)",
                                  None),
}
def run_mutant(mutant, monkeypatch):
    """Runs the scan (forward, or forward and gradients) with the mutant and compares it with the
    reference as the tests above do: an AssertionError when it differs."""
    kind, old, new, _ = MUTANTS[mutant]
    plant(monkeypatch, kind, old, new)
    x = mamba2_inputs(**M2)
    names = ["x", "dt", "A", "B", "C"]
    fn = lambda be: lambda **a: ops.ssd(**a, chunk_size=16, return_final_states=True, backend=be)  # noqa: E731
    if kind == "bwd" or "checkpoint" in mutant:
        w = [mx.ones(x["x"].shape), mx.ones(x["initial_states"].shape)]
        got, ref = _grads(fn("metal"), x, names, w), _grads(fn("reference"), x, names, w)
    else:
        names = ["y", "last"]
        got, ref = fn("metal")(**x), fn("reference")(**x)
    close(dict(zip(names, got)), dict(zip(names, ref)))


@pytest.mark.parametrize("mutant", [pytest.param(m, marks=needs_race_detector) if MUTANTS[m][3] else m
                                    for m in MUTANTS])
def test_harness_catches_broken_kernels(mutant, monkeypatch):
    harness.install(monkeypatch)
    monkeypatch.setattr(harness.EmulatedKernel, "order", 1)  # reversed: a deterministic worst case
    try:
        with pytest.raises((AssertionError, harness.EmulatorError)) as caught:
            run_mutant(mutant, monkeypatch)
        assert "re-target it" not in str(caught.value), caught.value  # the mutant must still apply
    finally:
        kernel_ops._kernel.cache_clear()


@needs_race_detector
@pytest.mark.parametrize("mutant", [m for m in MUTANTS if MUTANTS[m][3]])
def test_missing_barrier_is_a_race_under_every_schedule(mutant, monkeypatch):
    """The race is reported, naming the array and both threads, whatever order the fibers run in."""
    harness.install(monkeypatch)
    try:
        for order in (0, 1, 2):
            monkeypatch.setattr(harness.EmulatedKernel, "order", order)
            with pytest.raises(harness.EmulatorError, match=MUTANTS[mutant][3]):
                run_mutant(mutant, monkeypatch)
    finally:
        kernel_ops._kernel.cache_clear()


TOY_METAL = """
  threadgroup float stage[64];
  const uint i = thread_position_in_grid.x, l = thread_index_in_simdgroup;
  const float v = float(inp[i]);
  stage[thread_index_in_threadgroup] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint n = threads_per_threadgroup.x;
  out[i * 8 + 0] = simd_sum(v);
  out[i * 8 + 1] = simd_prefix_inclusive_sum(v);
  out[i * 8 + 2] = simd_prefix_exclusive_sum(v);
  out[i * 8 + 3] = simd_shuffle_down(v, 3);
  out[i * 8 + 4] = simd_shuffle_up(v, 5);
  out[i * 8 + 5] = simd_broadcast(v, 2);
  out[i * 8 + 6] = simd_shuffle_xor(v, 1);
  out[i * 8 + 7] = stage[(thread_index_in_threadgroup + 1) % n] + float(l) * 0.0f;
"""


def test_emulator_collectives(monkeypatch):
    """simd collectives span 32 lanes (fewer in a cut edge group); threadgroup memory is shared."""
    k = harness.EmulatedKernel("metal", "toy", ["inp"], ["out"], TOY_METAL)
    n, tg = 70, 64  # groups of 64 and 6 threads: simdgroups of 32, 32 and 6 lanes
    v = np.arange(1, n + 1, dtype=np.float32) ** 1.5
    out = np.array(k(inputs=[mx.array(v)], output_shapes=[(n, 8)], output_dtypes=[mx.float32],
                     grid=(n, 1, 1), threadgroup=(tg, 1, 1))[0])
    want = np.zeros((n, 8), np.float32)
    for s0 in range(0, n, 32):
        lanes = v[s0:min(s0 + 32, (s0 // tg) * tg + tg, n)]
        w = len(lanes)
        for l in range(w):
            i = s0 + l
            g0, gn = (i // tg) * tg, min(tg, n - (i // tg) * tg)
            want[i] = [lanes.sum(), lanes[:l + 1].sum(), lanes[:l].sum(), lanes[l + 3] if l + 3 < w else lanes[l],
                       lanes[l - 5] if l >= 5 else lanes[l], lanes[2], lanes[l ^ 1], v[g0 + (i - g0 + 1) % gn]]
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_emulator_reports_divergent_barrier():
    src = """
      if (thread_position_in_grid.x % 2 == 0) threadgroup_barrier(mem_flags::mem_threadgroup);
      out[thread_position_in_grid.x] = 1.0f;
    """
    k = harness.EmulatedKernel("metal", "divergent", ["inp"], ["out"], src)
    with pytest.raises(harness.EmulatorError, match="deadlock"):
        k(inputs=[mx.zeros((8,))], output_shapes=[(8,)], output_dtypes=[mx.float32], grid=(8, 1, 1),
          threadgroup=(8, 1, 1))


# Counts work in the emulator: every MM_EXP and MM_SHFL_XOR, every global load of B or C (staging).
COUNTER = """
struct MmCount {
  std::atomic<long> exps{0}, shuffles{0}, loads{0};
  ~MmCount() {
    if (FILE* f = std::fopen(std::getenv("MM_COUNT_FILE"), "w")) {
      std::fprintf(f, "%ld %ld %ld", exps.load(), shuffles.load(), loads.load());
      std::fclose(f);
    }
  }
};
inline MmCount mm_count;
inline float mm_counted(std::atomic<long>& n) { n.fetch_add(1, std::memory_order_relaxed); return 1.0f; }
"""


def counted_work(monkeypatch, tmp_path, run):
    """{kernel name: [exponentials, shuffles, global loads of B and C]} of run()'s launches."""
    for prelude in ("_METAL_PRELUDE", "_CUDA_PRELUDE"):
        text = getattr(kernel_source, prelude).replace(
            "#define MM_EXP(x) ", "#define MM_EXP(x) mm_counted(mm_count.exps) * ").replace(
            "#define MM_SHFL_XOR(v, m) ", "#define MM_SHFL_XOR(v, m) mm_counted(mm_count.shuffles) * ")
        monkeypatch.setattr(kernel_source, prelude, COUNTER + text)
    for kind, body in kernel_source.BODIES.items():
        for m in ("Bm", "Cm"):
            body = body.replace(f"float({m}[src])", f"(mm_counted(mm_count.loads) * float({m}[src]))")
        monkeypatch.setitem(kernel_source.BODIES, kind, body)
    kernel_ops._kernel.cache_clear()
    monkeypatch.setenv("MM_COUNT_FILE", str(tmp_path / "count"))
    counts = {}
    launch = harness.EmulatedKernel.__call__

    def counting_launch(self, **kw):
        outs = launch(self, **kw)
        done = counts.setdefault(self.name, [0, 0, 0])
        for i, n in enumerate((tmp_path / "count").read_text().split()):
            done[i] += int(n)
        return outs
    monkeypatch.setattr(harness.EmulatedKernel, "__call__", counting_launch)
    mx.eval(run())
    kernel_ops._kernel.cache_clear()
    return counts


def test_work_per_token_mamba2_2_7b(monkeypatch, tmp_path):
    """A decode step of Mamba2 2.7B's layer (H=80, P=64, N=128, G=1): per thread (4 channels of
    one head, 32 lanes each) one exp(dt * A), one softplus and 3 + 3 shuffles, one gate per
    channel; B and C read once per threadgroup of 16 channels (KERNELS.md: before and after)."""
    harness.install(monkeypatch)
    x = mamba2_inputs(b=1, L=1, H=80, P=64, G=1, N=128)
    args = dict(state=x["initial_states"], x=x["x"][:, 0], dt=x["dt"][:, 0], A=x["A"], B=x["B"][:, 0],
                C=x["C"][:, 0], D=x["D"], z=x["z"][:, 0], dt_bias=x["dt_bias"], dt_softplus=True)
    counts = counted_work(monkeypatch, tmp_path, lambda: ops.ssd_step(**args, backend="metal"))
    CH = 80 * 64
    assert counts == {"mlx_mamba_scan_fwd": [CH // 4 * 32 * 2 + CH, CH // 4 * 32 * 6, CH // 16 * 2 * 128]}


def test_backward_work_per_token(monkeypatch, tmp_path):
    """The backward kernel at N=128: per lane and step, one exp(dt * A) and one softplus in the
    recomputation, the same and the gate's sigmoid in the reverse walk, and the softplus'
    derivative on lane 0; 3 sums of 5 shuffles; B and C read once per threadgroup of 8 channels."""
    harness.install(monkeypatch)
    b, L, H, P, N = 1, 8, 2, 64, 128
    x = mamba2_inputs(b=b, L=L, H=H, P=P, G=1, N=N)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    weights = [mx.ones(x["x"].shape), mx.ones(x["initial_states"].shape)]
    scan = lambda **a: ops.ssd(  # noqa: E731
        **a, chunk_size=16, dt_softplus=True, return_final_states=True, backend="metal")
    counts = counted_work(monkeypatch, tmp_path, lambda: _grads(scan, x, names, weights))
    CH = H * P
    assert counts["mlx_mamba_scan_bwd"] == [L * CH * (32 * 5 + 2), L * CH * 32 * 15, L * CH // 8 * 2 * N]


@pytest.mark.parametrize("N, what", [(4097, "forward"), (2049, "gradient")])
def test_threadgroup_memory_bound(backend, monkeypatch, N, what):
    """A state too large for 32 KB of threadgroup memory is refused by name, never launched."""
    launched = []

    def launch(self, *, output_shapes, output_dtypes, **_):  # only the forward kernel may run
        launched.append(self.name)
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
    monkeypatch.setattr(harness.EmulatedKernel, "__call__", launch)
    x = mamba2_inputs(b=1, L=3, H=1, P=1, G=1, N=N, options=False)
    scan = lambda **a: ops.ssd(**a, chunk_size=16, backend=backend)  # noqa: E731
    with pytest.raises(ValueError, match=f"d_state N={N} is too large for the {what} scan kernel: "
                                         r"it needs \d+ bytes of threadgroup memory, over the limit of 32768"):
        if what == "forward":
            scan(**x)
        else:
            mx.grad(lambda B: scan(**dict(x, B=B)).sum())(x["B"])
    assert "mlx_mamba_scan_bwd" not in launched and (what == "gradient" or not launched)


def run_toy(src, n=64, tg=64, order=0, backend="metal", atomic=False):
    """Runs a toy kernel over inp = 0 .. n-1 into out (n,), zeroed; returns out."""
    k = harness.EmulatedKernel(backend, "toy", ["inp"], ["out"], src, atomic_outputs=atomic)
    k.order, k.workers = order, 1  # threadgroups one after the other, in order
    out = k(inputs=[mx.arange(n).astype(mx.float32)], output_shapes=[(n,)], output_dtypes=[mx.float32],
            grid=(n, 1, 1), threadgroup=(tg, 1, 1), init_value=0.0)
    return np.array(out[0])


SYNC = "threadgroup_barrier(mem_flags::mem_threadgroup);"
STAGE = "threadgroup float s[64];\n  const uint t = thread_position_in_threadgroup.x;\n  s[t] = inp[t];\n"
# Each thread takes its right neighbour's value: read s[t + 1] before the neighbour overwrites it.
SHIFT = STAGE + "  {}\n  const float v = s[(t + 1) % 64];\n  {}\n  s[t] = v;\n  {}\n  out[t] = s[t];\n"
TOY_RACES = {  # race: a kernel that has it, seen as such with the fibers in order
    "read after write": STAGE + "  out[t] = s[(t + 63) % 64];\n",
    "write after read": SHIFT.format(SYNC, "", SYNC),
    "write after write": "threadgroup float s[32];\n  const uint t = thread_position_in_threadgroup.x;\n"
                         f"  s[t / 2] = inp[t];\n  {SYNC}\n  out[t] = s[t / 2];\n",
}


@needs_race_detector
@pytest.mark.parametrize("race", TOY_RACES)
def test_emulator_reports_each_race(race):
    with pytest.raises(harness.EmulatorError, match=rf"data race \({race}\) on threadgroup array 's'\[\d+\]: "
                                                     r"thread \d+ of threadgroup \(0,0,0\) .*, then thread \d+"):
        run_toy(TOY_RACES[race])
    for order in (1, 2):  # another schedule may see the same race from the other side
        with pytest.raises(harness.EmulatorError, match=r"data race \(.*\) on threadgroup array 's'"):
            run_toy(TOY_RACES[race], order=order)


@needs_race_detector
@pytest.mark.parametrize("order", [0, 1, 2])
def test_emulator_passes_barrier_separated_accesses(order):
    out = run_toy(SHIFT.format(SYNC, SYNC, SYNC), order=order)
    np.testing.assert_array_equal(out, (np.arange(64) + 1) % 64)


@needs_race_detector
def test_emulator_atomics_do_not_race_with_each_other():
    src = """
      const uint t = thread_position_in_grid.x;
      atomic_fetch_add_explicit(&out[t % 4], 1.0f, memory_order_relaxed);
      if (t == 0) atomic_store_explicit(&out[4], 2.0f, memory_order_relaxed);
      if (t == 9) atomic_fetch_add_explicit(&out[4], 1.0f, memory_order_relaxed);
    """
    out = run_toy(src, n=64, tg=16, atomic=True)  # 4 threadgroups
    assert list(out[:4]) == [16.0] * 4 and out[4] in (2.0, 3.0)
    mixed = src.replace("atomic_fetch_add_explicit(&out[4], 1.0f, memory_order_relaxed)",  # a plain store
                        "*(device float*)&out[4] = 1.0f")
    with pytest.raises(harness.EmulatorError, match=r"data race \(write after write\) on device output 'out'\[4\]"):
        run_toy(mixed, n=64, tg=16, atomic=True)


@needs_race_detector
def test_emulator_barriers_do_not_order_threadgroups():
    src = """
      const uint t = thread_position_in_grid.x;
      if (t == 0) out[0] = 1.0f;
      threadgroup_barrier(mem_flags::mem_device);
      if (t == 20) out[1] = out[0];
    """
    with pytest.raises(harness.EmulatorError, match=r"data race \(read after write\) on device output 'out'\[0\]: "
                       r"thread 0 of threadgroup \(0,0,0\) wrote it, then thread 4 of threadgroup \(1,0,0\) read it "
                       r"\(threads of different threadgroups never synchronize\)"):
        run_toy(src, n=32, tg=16)
    out = run_toy(src.replace("t == 20", "t == 5"), n=32, tg=16)  # the same threadgroup: ordered
    assert out[1] == 1.0


@needs_race_detector
def test_emulator_reports_unwritten_threadgroup_memory():
    with pytest.raises(harness.EmulatorError, match=r"threadgroup array 's'\[\d+\] was read by thread \d+ of "
                                                     r"threadgroup \(0,0,0\) before any thread of its threadgroup wrote it"):
        run_toy(STAGE.replace("s[t] = inp[t];", f"if (t > 0) s[t] = inp[t];\n  {SYNC}") + "  out[t] = s[63 - t];\n")


@needs_race_detector
def test_emulator_reports_cuda_races():
    src = "__shared__ float s[64];\n  const int t = threadIdx.x;\n  s[t] = inp[t];\n  out[t] = s[(t + 63) % 64];\n"
    with pytest.raises(harness.EmulatorError, match=r"data race \(read after write\) on threadgroup array 's'"):
        run_toy(src, backend="cuda")
    out = run_toy(src.replace("  out[t]", "  __syncthreads();\n  out[t]"), backend="cuda", order=2)
    np.testing.assert_array_equal(out, (np.arange(64) + 63) % 64)


@needs_race_detector
def test_emulator_simdgroup_barrier_orders_its_lanes_only():
    src = STAGE + "  simdgroup_barrier(mem_flags::mem_threadgroup);\n  out[t] = s[t ^ 1];\n"
    np.testing.assert_array_equal(run_toy(src, order=2), np.arange(64) ^ 1)
    with pytest.raises(harness.EmulatorError, match=r"data race \(.*\) on threadgroup array 's'"):
        run_toy(src.replace("s[t ^ 1]", "s[t ^ 32]"), order=2)
