"""A review of the kernels' text where no compiler can look: there is no Metal compiler off a Mac,
so the rules that Apple's compiler and GPUs impose are checked here on the text MLX would compile
(the rendered kernels wrapped as MLX wraps them, for every dtype and checkpoint template).

- No doubles (Metal has none; on CUDA they are slow): no `double`, and every floating literal
  carries the suffix f (or h). Integer literals are integers, whatever they meet.
- Address spaces (Metal): every pointer or reference declared anywhere in the text names one
  (device, constant, threadgroup, thread), and threadgroup arrays are declared only at the top
  level of the kernel body, never in a helper, a branch or a loop.
- Threadgroup memory (Metal): the threadgroup arrays of each kernel, sized with the template
  arguments, fit in 32 KB (Apple GPUs' limit per threadgroup), and are what kernel_ops._layout
  counts when it bounds them.
- Uniform barriers (Metal and CUDA): every barrier, every simd/warp shuffle and every call of a
  helper that contains one sits only in `if`/`for`/`while`/`switch` whose headers use no
  thread-varying value, and no `return`/`break`/`continue`/`goto` sits under a thread-varying
  condition (the rule does not check whether a barrier follows: stricter than needed).
  Thread-varying: the thread-index built-ins (Metal's thread_position_in_threadgroup, ...;
  CUDA's threadIdx) and every variable or array (a declaration, in its scope, regardless of
  order) assigned from a thread-varying value or under a thread-varying condition. What a text
  check cannot tell: a value that is equal in every thread but read through a thread-varying
  index counts as varying (the safe side); inside a helper, a collective may sit under a
  condition on the helper's parameters, which are not followed back to the call.
"""
import re
from typing import NamedTuple

import mlx.core as mx
import pytest

import kernel_texts
from mlx_mamba.ops import kernel_ops
from mlx_mamba.ops import kernel_source as ks

THREADGROUP_LIMIT = 32768
ADDRESS_SPACES = {"device", "constant", "threadgroup", "thread"}
VARYING_BUILTINS = {"thread_position_in_threadgroup", "thread_position_in_grid", "thread_index_in_threadgroup",
                    "thread_index_in_simdgroup", "thread_index_in_quadgroup", "simdgroup_index_in_threadgroup",
                    "quadgroup_index_in_threadgroup", "threadIdx"}
COLLECTIVE = r"MM_SYNC|MM_SHFL_XOR|threadgroup_barrier|simdgroup_barrier|__syncthreads|__shfl\w*|simd_\w+|quad_\w+"
SIZES = {"float": 4, "int": 4, "uint": 4, "half": 2, "bfloat": 2, "float16_t": 2, "bfloat16_t": 2, "short": 2}
SCALARS = "float|half|bfloat|int|uint|short|ushort|char|uchar|bool|long|ulong"
IDENT = re.compile(r"[A-Za-z_]\w*")


def code_of(text):
    """`text` without comments and string literals."""
    return re.sub(r'//[^\n]*|/\*.*?\*/|"[^"\n]*"', " ", text, flags=re.S)


def line_at(text, pos):
    """The line of `text` around position `pos`."""
    end = text.find("\n", pos)
    return text[text.rfind("\n", 0, pos) + 1:end if end >= 0 else None].strip()


def _close(code, i):
    """Index after the bracket that closes the one at code[i]."""
    depth = 0
    for j in range(i, len(code)):
        depth += code[j] in "([{"
        depth -= code[j] in ")]}"
        if depth == 0:
            return j + 1
    raise ValueError(f"unbalanced {code[i]!r}")


class Statement(NamedTuple):
    text: str
    headers: tuple  # the if/for/while/switch headers around it, outermost first
    header_uses: tuple  # the variables each header reads
    assigns: list  # [(variable, the variables its new value depends on)]


# A declaration: qualifiers and a type, then the first declarator's name.
DECLARATION = re.compile(rf"\s*(?:(?:const|constexpr|static|MM_SHARED|threadgroup|thread)\s+)*"
                         rf"(?:{SCALARS}|\w+_t|T)\s+(?=[A-Za-z_])")


def statements(code):
    """[Statement] of a function body: its simple statements, in order. Variables are named
    `name@n` after their declaration, so that the same name in two scopes is two variables; an
    `else` branch gets its `if` header; a for header counts for its own increment, not for its
    initialisation."""
    out, scopes, count = [], [{}], [0]

    def resolve(text):
        return frozenset(next((sc[n] for sc in reversed(scopes) if n in sc), n) for n in IDENT.findall(text))

    def simple(text, headers, header_uses):
        m = DECLARATION.match(text)
        assigns = []
        for part in _split_top(text[m.end() if m else 0:].rstrip().rstrip(";"), ","):
            if m:  # a declarator: name [size] [= value]
                name = IDENT.match(part.strip()).group()
                value = part.split("=", 1)[1] if re.search(r"(?<![=!<>])=(?!=)", part) else None
                uses = resolve(value) if value is not None else None
                count[0] += 1
                scopes[-1][name] = f"{name}@{count[0]}"
                if uses is not None:
                    assigns.append((scopes[-1][name], uses))
            else:
                assigns += [(next(iter(resolve(target))), resolve(uses)) for target, uses in _assignments(part)]
        out.append(Statement(text, headers, header_uses, assigns))

    def walk(i, headers, header_uses):  # one statement at code[i:]; returns the index after it
        i = len(code) - len(code[i:].lstrip())
        m = re.match(r"(if|for|while|switch|do)\b", code[i:])
        if m and m.group(1) == "do":
            raise ValueError("the review does not read do-while loops")
        if m:
            start = code.index("(", i)
            end = _close(code, start)
            header = code[i:end]
            scopes.append({})
            if m.group(1) == "for":
                init, cond, step = code[start + 1:end - 1].split(";")
                simple(init, headers, header_uses)
                inner = (headers + (header,), header_uses + (resolve(init + ";" + cond + ";" + step),))
                simple(step, *inner)
            else:
                inner = (headers + (header,), header_uses + (resolve(code[start:end]),))
            i = walk(end, *inner)
            nxt = re.match(r"\s*else\b", code[i:])
            if m.group(1) == "if" and nxt:
                i = walk(i + nxt.end(), *inner)
            scopes.pop()
            return i
        if code[i] == "{":
            scopes.append({})
            i += 1
            while code[i:].strip()[:1] != "}":
                i = walk(i, headers, header_uses)
            scopes.pop()
            return code.index("}", i) + 1
        j = i
        while code[j] != ";":
            j = _close(code, j) if code[j] in "([{" else j + 1
        simple(code[i:j + 1], headers, header_uses)
        return j + 1

    i = 0
    while code[i:].strip():
        i = walk(i, (), ())
    return out


def _split_top(s, sep):
    parts, depth, last = [], 0, 0
    for j, ch in enumerate(s):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == sep and depth == 0:
            parts.append(s[last:j])
            last = j + 1
    return parts + [s[last:]]


def _assignments(expression):
    """[(target, text its value depends on)] of an expression that declares nothing: an assignment
    (plain or compound, to a variable or an array element), ++ or --."""
    out = []
    m = re.search(r"(?<![=!<>])(?:[-+*/%&|^]|<<|>>)?=(?!=)", expression)
    if m:
        lhs = re.match(r"\s*(\w+)\s*(\[.*\])?\s*$", expression[:m.start()])
        if lhs:
            out.append((lhs.group(1), expression[m.end():] + (lhs.group(2) or "")))
    for name in re.findall(r"(?:\+\+|--)\s*(\w+)|(\w+)\s*(?:\+\+|--)", expression):
        out.append((name[0] or name[1], ""))
    return out


def varying_variables(stmts, seeds=VARYING_BUILTINS):
    """The thread-varying variables of a body (see the module docstring), to a fixed point."""
    varying = set(seeds)
    while True:
        before = len(varying)
        for st in stmts:
            under_varying = any(varying & uses for uses in st.header_uses)
            for target, uses in st.assigns:
                if under_varying or varying & uses:
                    varying.add(target)
        if len(varying) == before:
            return varying


def helpers(header):
    """{name: body} of the MM_FN functions of a rendered header."""
    code = code_of(header)
    out = {}
    for m in re.finditer(r"\bMM_FN\s+\w+\s+(\w+)\s*\([^)]*\)\s*\{", code):
        out[m.group(1)] = code[m.end() - 1:_close(code, m.end() - 1)]
    return out


def _collective_pattern(header):
    """Calls of a collective: barriers, shuffles, and the helpers that contain one."""
    names = [n for n, body in helpers(header).items() if re.search(rf"\b({COLLECTIVE})\s*\(", body)]
    return re.compile(rf"\b({'|'.join([COLLECTIVE, *names])})\s*\(")


def nonuniform_collectives(header, source):
    """Collectives and jumps of the kernel body and helpers that sit under a thread-varying condition."""
    collective = _collective_pattern(header)
    problems = []
    bodies = {"the kernel body": code_of(source)}
    bodies.update({f"helper {n}": body[1:-1] for n, body in helpers(header).items()})
    for where, code in bodies.items():
        stmts = statements(code)
        varying = varying_variables(stmts)
        for st in stmts:
            bad = [h for h, uses in zip(st.headers, st.header_uses) if varying & uses]
            what = collective.search(st.text) or re.search(r"\b(return|break|continue|goto)\b", st.text)
            if bad and what:
                problems.append(f"{where}: `{what.group(1)}` in `{st.text.strip()}` under the "
                                f"thread-varying `{bad[-1].strip()}`")
    return problems


def double_uses(text):
    """`double` and floating literals without the suffix f or h."""
    code = code_of(text)
    problems = [f"`double` in `{line_at(code, m.start())}`" for m in re.finditer(r"\bdouble\b", code)]
    for m in re.finditer(r"(?<![\w.])\.?\d(?:[eEpP][+-]|[\w.])*", code):
        tok = m.group()
        hexa = tok[:2].lower() == "0x"
        floating = "p" in tok.lower() if hexa else ("." in tok or "e" in tok.lower())
        if floating and tok[-1] not in "fFhH":
            problems.append(f"the double literal `{tok}` (add f) in `{line_at(code, m.start())}`")
    return problems


def unqualified_pointers(text, typenames):
    """Pointer and reference declarations without an address space (Metal requires one)."""
    types = "|".join([r"(?:metal::)?atomic<\w+>", rf"(?:{SCALARS}|\w+_t|{'|'.join(typenames)})[234]?"])
    decl = re.compile(rf"((?:\b\w+\s+)*)\b({types})\s*[*&]\s*(\w+)\s*(?=[,)=;\[])")
    code = code_of(text)
    return [f"`{m.group().strip()}` has no address space in `{line_at(code, m.start())}`"
            for m in decl.finditer(code) if not ADDRESS_SPACES & set(m.group(1).split())]


def _shared_arrays(code):
    return re.compile(r"\b(?:MM_SHARED|threadgroup)\s+(\w+)\s+(\w+)\s*\[([^\]]*)\]").finditer(code)


def threadgroup_arrays(source, template):
    """[(name, the header around its declaration or None, bytes or None when not a compile-time
    size)] of the kernel body's threadgroup arrays, sized with `template` and the body's constexprs."""
    env = {name: (v if isinstance(v, int) else 0) for name, v in template}
    dtype_size = {name: v.size for name, v in template if not isinstance(v, int)}
    out = []
    for statement, headers, *_ in statements(code_of(source)):
        for m in re.finditer(r"\bconstexpr\s+int\s+(.*);", statement):
            for part in _split_top(m.group(1), ","):
                name, expr = part.split("=", 1)
                env[name.strip()] = _evaluate(expr, env)
        for m in _shared_arrays(statement):
            try:
                size = _evaluate(m.group(3), env) * (SIZES.get(m.group(1)) or dtype_size[m.group(1)])
            except (NameError, SyntaxError, KeyError):
                size = None
            out.append((m.group(2), headers[-1].strip() if headers else None, size))
    return out


def threadgroup_problems(header, source, template):
    """Threadgroup arrays outside the kernel body's top level, or more than 32 KB of them."""
    problems = [f"helper text: threadgroup array `{m.group(2)}`" for m in _shared_arrays(code_of(header))]
    arrays = threadgroup_arrays(source, template)
    problems += [f"threadgroup array `{name}` inside `{where}`" for name, where, _ in arrays if where]
    problems += [f"threadgroup array `{name}`: no compile-time size" for name, _, size in arrays if size is None]
    total = sum(size or 0 for *_, size in arrays)
    if total > THREADGROUP_LIMIT:
        problems.append(f"{total} bytes of threadgroup memory for {template[1:]} (limit {THREADGROUP_LIMIT})")
    return problems


def _evaluate(expr, env):
    """An integer C expression of template constants: + - * / %, comparisons, one ?: ."""
    expr = expr.replace("/", "//")
    m = re.fullmatch(r"(.+?)\?(.+?):(.+)", expr)
    if m:
        expr = f"(({m.group(2)}) if ({m.group(1)}) else ({m.group(3)}))"
    return int(eval(expr, {"__builtins__": {}}, dict(env)))


KINDS = ["fwd", "bwd"]
DTYPES = list(kernel_texts.DTYPES)


def _review(backend, kind, dname, header=None, source=None):
    dtype = kernel_texts.DTYPES[dname]
    rendered = ks.render(backend, kind)
    header, source = header or rendered[0], source or rendered[1]
    out = {"double": [], "address": [], "threadgroup": [], "uniform": nonuniform_collectives(header, source)}
    for template in kernel_texts.checkpoint_templates(kind, dtype).values():
        text = kernel_texts.wrapped(backend, kind, dtype, template, header, source)[1]
        out["double"] += double_uses(text)
        if backend == "metal":
            out["address"] += unqualified_pointers(text, [n for n, v in template if not isinstance(v, int)])
            out["threadgroup"] += threadgroup_problems(header, source, template)
    return {k: list(dict.fromkeys(v)) for k, v in out.items()}


@pytest.mark.parametrize("backend", ["metal", "cuda"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dname", DTYPES)
def test_the_kernels_pass_the_review(backend, kind, dname):
    problems = _review(backend, kind, dname)
    assert problems == {"double": [], "address": [], "threadgroup": [], "uniform": []}


@pytest.mark.parametrize("kind", KINDS)
def test_the_layout_bound_is_the_text(kind):
    """kernel_ops._layout bounds threadgroup memory with its own arithmetic: for every layout it
    accepts (N = 1 .. 1024, Mamba1 and Mamba2 heads), the kernel's text asks for exactly that much."""
    source = ks.render("metal", kind)[1]
    layouts = set()
    for N in range(1, 1025):
        for P, channels_per_group in ((1, 1024), (64, 4096), (64, 64)):
            try:
                layouts.add(kernel_ops._layout(kind, N, P, channels_per_group))
            except ValueError:  # too large: refused by name (tests/test_kernels.py)
                pass
    for layout in layouts:
        template = [("T", mx.float32), *layout._asdict().items()]
        text_bytes = sum(size for *_, size in threadgroup_arrays(source, template))
        assert text_bytes == layout.shared_bytes(kind) <= THREADGROUP_LIMIT, layout


def test_the_review_reads_the_body():
    """The rules above see what they check: barriers inside loops, threadgroup arrays, pointers."""
    header, source = ks.render("metal", "bwd")
    stmts = statements(code_of(source))
    syncs = [st.headers for st in stmts if "MM_SYNC" in st.text]
    assert len(syncs) >= 3 and all(syncs)  # staging and the reduction, inside the chunk loops
    varying = {v.split("@")[0] for v in varying_variables(stmts)}
    assert {"tid", "lane", "c"} <= varying and not {"L", "N", "NC", "t0", "tt", "j"} & varying
    assert len(list(_shared_arrays(code_of(source)))) >= 3
    text = kernel_texts.wrapped("metal", "bwd", mx.float32, kernel_texts.template("bwd", mx.float32, 16, 1, 1536))[1]
    pointers = re.findall(r"(?:device|constant)\s+[\w<>]+\s*\*", text)
    assert len(pointers) == len(ks.BWD_INPUTS) + len(ks.BWD_OUTPUTS) and unqualified_pointers(text, ["T"]) == []


PLANTED = {  # check: [(where, text added at the end of the header or the body), ...]
    "double": [("body", "  double twice = 2 * Dc;\n"), ("header", "MM_FN float mm_half(float x) { return 0.5 * x; }\n"),
               ("body", "  const float tiny = 1e-5;\n")],
    "address": [("header", "MM_FN float mm_first(const float* p) { return p[0]; }\n"),
                ("header", "MM_FN void mm_set(float& r) { r = 0.0f; }\n")],
    "threadgroup": [("header", "MM_FN float mm_scratch() { MM_SHARED float t[4]; return t[0]; }\n"),
                    ("body", "  if (L > 1) { MM_SHARED float late[4]; late[0] = 0.0f; }\n"),
                    ("body", "  MM_SHARED float big[8192];\n"), ("body", "  MM_SHARED float per_run[L];\n")],
    "uniform": [("body", "  if (lane == 0) MM_SYNC();\n"),
                ("body", "  for (int i = tid; i < N; i += CPG * S) { MM_SYNC(); }\n"),
                ("body", "  const int mine = c * 2;\n  if (mine > 3) { MM_SYNC(); }\n"),
                ("body", "  int turns = 0;\n  if (lane < 4) turns = 1;\n"
                         "  for (int i = 0; i < turns; ++i) MM_SYNC();\n"),
                ("body", "  if (lane < 4) { const float s = mm_xor_sum(1.0f, 1, S); }\n"),
                ("body", "  if (tid >= 64) return;\n")],
}


METAL_ONLY = {"address", "threadgroup"}  # for CUDA, NVRTC checks these (tests/test_nvrtc.py)


@pytest.mark.parametrize("backend, check, where, planted",
                         [(b, c, w, p) for b in ("metal", "cuda") for c, cases in PLANTED.items()
                          if b == "metal" or c not in METAL_ONLY for w, p in cases])
def test_the_review_catches(backend, check, where, planted):
    header, source = ks.render(backend, "bwd")
    if where == "header":
        header += planted
    else:
        source += planted
    problems = _review(backend, "bwd", "float16", header, source)
    assert problems[check], f"{check}: nothing found in {planted!r}"
    assert all(not v for k, v in problems.items() if k != check), problems


def test_the_checked_text_is_what_kernel_ops_launches(monkeypatch):
    """The dtypes and template sizes reviewed and compiled are the ones kernel_ops launches: every
    launch of a float16 Mamba2 scan and its gradient is recorded (the kernels return zeros)."""
    launches = []

    class Recorder:
        def __init__(self, name, input_names, output_names, source, header="", **_):
            self.kind = "fwd" if list(input_names) == ks.FWD_INPUTS else "bwd"

        def __call__(self, *, inputs, output_shapes, output_dtypes, template, **_):
            launches.append((self.kind, [a.dtype for a in inputs], list(output_dtypes), list(template)))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

    monkeypatch.setattr(mx.fast, "cuda_kernel", Recorder)
    batch, L, H, P, G, N = 1, 3, 4, 64, 2, 64
    x = mx.zeros((batch, L, H, P), mx.float16)
    dt = mx.zeros((batch, L, H), mx.float16)
    B = mx.zeros((batch, L, G, N), mx.float16)

    def loss(x):
        y = kernel_ops.ssd("cuda", x, dt, -mx.ones((H,)), B, B, 256, mx.ones((H,)), x, mx.zeros((H,)), True,
                           (0.0, float("inf")), None, False)
        return y.astype(mx.float32).sum()

    kernel_ops._kernel.cache_clear()
    try:
        mx.eval(mx.grad(loss)(x))
    finally:
        kernel_ops._kernel.cache_clear()
    assert {kind for kind, *_ in launches} == {"fwd", "bwd"}
    for kind, ins, outs, template in launches:
        assert (ins, outs) == kernel_texts.signature(kind, mx.float16)
        assert template == kernel_texts.template(kind, mx.float16, N, P, H // G * P)
