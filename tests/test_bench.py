"""The bench harness and `l3k bench`: CPU runs are labelled, results files are valid, the gate catches regressions.

The GPU benches cannot run here; their case tables (shapes, FLOP and byte counts, peers) are built for the
GPU tiers without touching a GPU and checked against the issue's numbers.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from llama3_kernels.bench import bench_attention, bench_gemm, bench_model, cli, harness


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One quick CPU run of every family through the CLI entry, with JSON and markdown written."""
    d = tmp_path_factory.mktemp("bench")
    js, md = d / "cur.json", d / "cur.md"
    rc = cli.main(["--quick", "--device", "cpu", "--no-progress", "--json", str(js), "--markdown", str(md)])
    assert rc == 0
    return d, js, md


def _ours_rows(doc):
    """The rows where this project's op was timed (the ceiling rows have none)."""
    return [r for r in doc["rows"] if any(x["ours"] and x["status"] == "ok" for x in r["results"])]


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


def test_cpu_run_is_valid_and_labelled(cpu_run):
    _, js, md = cpu_run
    doc = harness.load_json(js)
    env, rows = doc["env"], doc["rows"]
    assert env["device"] == "cpu" and env["gpu"] is None and env["torch"] == torch.__version__
    assert env["commit"] and env["date"] and "llama3_kernels" in env
    assert [r["family"] for r in rows] == [f for f in cli.FAMILIES for r in rows if r["family"] == f]
    per_family = {f: sum(r["family"] == f for r in rows) for f in cli.FAMILIES}
    # norm: 2 CPU shapes x 3 modes; swiglu 2 x 2; loss and rope fwd, fwd+bwd; fp8 2 + 2 + 1; gemm 3 values of M + 2 decode GEMVs + the qkv GEMV
    # with RoPE and the cache append; attention
    # causal and document x fwd, bwd; decode 2 + rope_kv_cache 2; model train and decode
    assert per_family == {
        "ceiling": 2,
        "norm": 6,
        "swiglu": 4,
        "loss": 2,
        "rope": 2,
        "fp8": 5,
        "gemm": 6,
        "attention": 4,
        "decode": 4,
        "model": 2,
    }
    for r in rows:
        assert r["label"] == harness.CPU_LABEL
        ours = [x for x in r["results"] if x["ours"]]
        if r["family"] == "ceiling":  # the machine's bounds: no project op in these rows
            assert not ours and r["results"][0]["status"] == "ok" and r["speedup_vs_best_peer"] is None
            continue
        if r["family"] == "model" and all(x["status"] == "skipped" for x in r["results"]):
            continue  # the model package is missing in this checkout: every impl says so
        ok = [x for x in ours if x["status"] == "ok"]
        assert ok and ok[0]["ms"] > 0
        assert all(x["path"] in ("reference (CPU)", "") for x in ours)  # never presented as a kernel
        for x in r["results"]:
            if x["status"] == "ok":
                assert x["ms"] >= x["ms_min"] > 0 and x["reps"] >= 3 and x["mfu"] is None
            else:  # skipped or failed rows carry a reason and no number
                assert x["reason"] and x["ms"] is None and x["tbps"] is None
        if r["best_peer"] is not None:
            best = min(x["ms"] for x in r["results"] if not x["ours"] and x["status"] == "ok")
            assert r["speedup_vs_best_peer"] == pytest.approx(best / ok[0]["ms"])
    norm = next(r for r in rows if r["op"] == "rms_norm" and r["mode"] == "fwd" and r["shape"] == "37x760")
    assert norm["bytes"] == 2 * 37 * 760 * 2 + 760 * 2
    assert {x["impl"]: x["status"] for x in norm["results"]}["Liger-Kernel"] == "skipped"
    ours = next(x for x in norm["results"] if x["ours"])
    assert ours["tbps"] == pytest.approx(norm["bytes"] / (ours["ms"] / 1e3) / 1e12)
    text = md.read_text()
    assert "CPU reference timings only" in text and all(f"## {f}\n" in text for f in cli.FAMILIES)
    assert "bytes = 2·M·N·2 + N·2" in text and "FLOPs = 2·M·N·K" in text


def test_compare_gate_names_regressed_rows(cpu_run, capsys):
    d, js, _ = cpu_run
    doc = json.loads(js.read_text())
    faster = copy.deepcopy(doc)  # a synthetic baseline where this project's op was twice as fast
    victim = _ours_rows(faster)[1]
    for x in victim["results"]:
        if x["ours"]:
            x["ms"] /= 2
    rc = cli.main(["--compare", _write(d / "fast.json", faster), "--current", str(js), "--max-regression", "5%"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "REGRESSION: 1 row(s)" in out and victim["key"] in out and "+100.0%" in out

    slower = copy.deepcopy(doc)  # a baseline where everything was slower: the gate passes
    for r in slower["rows"]:
        for x in r["results"]:
            if x["status"] == "ok":
                x["ms"] *= 2
    assert cli.main(["--compare", _write(d / "slow.json", slower), "--current", str(js)]) == 0
    assert cli.main(["--compare", str(js), "--current", str(js), "--max-regression", "0"]) == 0


def test_compare_gate_counts_failures_and_tolerance(cpu_run):
    _, js, _ = cpu_run
    base = harness.load_json(js)
    cur = copy.deepcopy(base)
    cur_rows, base_rows = _ours_rows(cur), _ours_rows(base)  # same rows, same order
    row = cur_rows[0]
    ours = next(x for x in row["results"] if x["ours"])
    ours.update(status="error", reason="CUDA error: illegal address", ms=None)
    peer = next(x for x in cur_rows[2]["results"] if not x["ours"] and x["status"] == "ok")
    peer["ms"] *= 10  # a peer got slower: not this project's regression unless all impls are gated
    bad = harness.compare(base, cur, 0.05)
    assert len(bad) == 1 and row["key"] in bad[0] and "illegal address" in bad[0]
    assert len(harness.compare(base, cur, 0.05, all_impls=True)) == 2
    ours_ms = next(x for x in cur_rows[3]["results"] if x["ours"])
    ours_ms["ms"] = next(x for x in base_rows[3]["results"] if x["ours"])["ms"] * 1.04
    assert len(harness.compare(base, cur, 0.05)) == 1  # +4% is inside a 5% gate
    assert len(harness.compare(base, cur, 0.03)) == 2


def test_compare_refuses_other_device_and_bad_args(cpu_run, tmp_path, capsys):
    _, js, _ = cpu_run
    other = harness.load_json(js)
    other["env"].update(device="cuda", gpu="NVIDIA H100 80GB HBM3")
    assert cli.main(["--compare", _write(tmp_path / "h100.json", other), "--current", str(js)]) == 2
    assert "cannot compare" in capsys.readouterr().err
    assert cli.main(["--ops", "norm,nonsense", "--device", "cpu"]) == 2
    assert cli.main(["--current", str(js)]) == 2
    (tmp_path / "junk.json").write_text('{"rows": 3}')
    assert cli.main(["--compare", str(tmp_path / "junk.json"), "--current", str(js)]) == 2


def test_run_then_compare_in_one_command(tmp_path, capsys):
    """The CI form: run the benches and gate against a baseline in one call (a baseline no CPU can beat)."""
    base = tmp_path / "base.json"
    assert cli.main(["--quick", "--device", "cpu", "--ops", "fp8", "--no-progress", "--json", str(base)]) == 0
    doc = json.loads(base.read_text())
    for r in doc["rows"]:
        for x in r["results"]:
            if x["ours"] and x["status"] == "ok":
                x["ms"] = 1e-9
    _write(base, doc)
    rc = cli.main(["--quick", "--device", "cpu", "--ops", "fp8", "--no-progress", "--compare", str(base)])
    out = capsys.readouterr().out
    assert rc == 1 and "quantize_fp8_rowwise | fwd | 256x1024" in out


@pytest.mark.parametrize("text,value", [("5%", 0.05), ("0.05", 0.05), ("12.5%", 0.125), ("0", 0.0)])
def test_parse_fraction(text, value):
    assert harness.parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["five", "-5%", "%"])
def test_parse_fraction_rejects(text):
    with pytest.raises(ValueError, match="max-regression"):
        harness.parse_fraction(text)


def test_timer_cpu_median():
    timer = harness.Timer(torch.device("cpu"), harness.Settings(warmup=1, min_reps=5, max_reps=5, budget_ms=1))
    calls = []
    med, low, reps = timer.measure(lambda: calls.append(1))
    assert reps == 5 and len(calls) == 1 + 2 + 5 and 0 < low <= med


def test_failing_impl_becomes_error_row_not_a_number():
    def boom(_):
        raise RuntimeError("no kernel image for this device")

    case = harness.Case("t", "op", "fwd", "1", "bf16", lambda: None, [
        harness.Impl(harness.OURS, lambda _: lambda: None, ours=True),
        harness.Impl("peer", boom),
        harness.Impl("absent", skip="not installed"),
    ], bytes=10)  # fmt: skip
    timer = harness.Timer(torch.device("cpu"), harness.Settings(warmup=1, min_reps=3, max_reps=3))
    rows = harness.row_dict(case, harness.run_case(case, timer), harness.CPU_LABEL)
    by = {x["impl"]: x for x in rows["results"]}
    assert by["peer"]["status"] == "error" and "no kernel image" in by["peer"]["reason"] and by["peer"]["ms"] is None
    assert by["absent"]["status"] == "skipped" and by["absent"]["reason"] == "not installed"
    assert by[harness.OURS]["status"] == "ok" and rows["speedup_vs_best_peer"] is None


def _gpu_cases(family_module, quick=False):
    return family_module.cases(harness.Context(torch.device("cuda"), quick=quick))


def test_gpu_case_tables_match_the_issue():
    """Full-tier cases build without a GPU; shapes and FLOP counts are the issue's."""
    from llama3_kernels.bench import bench_decode, bench_fp8, bench_loss, bench_norm, bench_rope, bench_swiglu

    counts = {bench_norm: 9, bench_swiglu: 4, bench_loss: 2, bench_fp8: 7, bench_gemm: 40 + 7, bench_attention: 10}
    counts |= {bench_decode: 6, bench_rope: 2}
    for mod, n in counts.items():
        cases = _gpu_cases(mod)
        assert len(cases) == n, mod.FAMILY
        for c in cases:
            assert sum(i.ours for i in c.impls) >= 1 and any(not i.ours for i in c.impls)
            assert c.formula and (c.bytes or c.flops)
        assert len({c.key for c in cases}) == n  # keys identify rows for the gate
    gemm = {c.shape: c for c in _gpu_cases(bench_gemm) if c.op == "fp8_rowwise_mm"}
    c = gemm["405B w2 M=8192 N=16384 K=53248"]
    assert c.flops == 2 * 8192 * 16384 * 53248 and c.peak == harness.PEAK_TFLOPS["fp8"]
    assert "1 " not in {s.split("M=")[1].split()[0] for s in gemm} and len({s.split(" M=")[0] for s in gemm}) == 8
    gemv = [c for c in _gpu_cases(bench_gemm) if c.op == "decode_linear"]
    assert {c.shape.split(" M=")[0] for c in gemv} >= {"1B norm+lm_head", "8B swiglu+w2"}
    assert all(c.flops == 2 * int(c.shape.split("N=")[1].split()[0]) * int(c.shape.split("K=")[1]) for c in gemv)
    attn = _gpu_cases(bench_attention)
    causal = [c for c in attn if c.op == "flash_attention causal"]
    issue = {f"B={16384 // s} S={s} H=32/8 D=128" for s in (1024, 4096, 16384)}
    assert {c.shape for c in causal} == issue | {"B=2 S=4096 H=32/8 D=64"}  # + the 1B train step's attention
    fwd = next(c for c in causal if c.mode == "fwd" and "S=4096" in c.shape and "D=128" in c.shape)
    bwd = next(c for c in causal if c.mode == "bwd" and "S=4096" in c.shape and "D=128" in c.shape)
    assert fwd.flops == 4 * 4 * 32 * 4096**2 * 128 / 2 and bwd.flops == 2.5 * fwd.flops
    small = next(c for c in causal if c.mode == "fwd" and "D=64" in c.shape)
    assert small.flops == 4 * 2 * 32 * 4096**2 * 64 / 2
    quick = _gpu_cases(bench_norm, quick=True)
    assert {c.shape for c in quick} == {"16384x4096"}


def test_document_mask_flops_are_exact():
    rng = random.Random(0)
    lengths = bench_attention.doc_lengths(8192, 256, 4096, rng)
    assert sum(lengths) == 8192 and all(n <= 4096 for n in lengths) and all(n >= 256 for n in lengths[:-1])
    doc = next(c for c in _gpu_cases(bench_attention) if c.op == "flash_attention document" and c.mode == "fwd")
    rng = random.Random(bench_attention.DOC_SEED)
    docs = [bench_attention.doc_lengths(8192, 256, 4096, rng) for _ in range(2)]
    pairs = sum(n * (n + 1) // 2 for d in docs for n in d)
    assert doc.flops == 4 * 32 * 128 * pairs
    dense = 4 * 2 * 32 * 8192**2 * 128 / 2
    assert doc.flops < dense  # the document mask removes work beyond the causal half


def test_document_mask_inputs_agree():
    """cu_seqlens, the FlexAttention document ids and the dense SDPA mask describe the same documents."""
    ctx = harness.Context(torch.device("cpu"))
    docs = [[3, 5], [8]]
    i = bench_attention._inputs(ctx, 2, 8, 2, 1, 8, False, docs)()
    assert i["cu_seqlens"].tolist() == [0, 3, 8, 16] and i["max_seqlen"] == 8
    assert i["doc_id"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8]
    m = i["dense_mask"][0, 0]
    assert m[4, 3] and not m[3, 2 + 2] and not m[4, 2] and m[2, 0] and not m[0, 2]


def test_plain_peer_model_is_the_same_model():
    """The plain-PyTorch peer computes the project model's logits (fp32, CPU), so the end-to-end rows compare like with like."""
    if bench_model.model_skip():
        pytest.skip(bench_model.model_skip())
    ctx = harness.Context(torch.device("cpu"))
    cfg = bench_model._config(ctx)
    ours, plain = bench_model._models(ctx, cfg, torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        a, b = ours(tokens), plain(tokens)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    i = bench_model._decode_inputs(ctx, cfg, 96, 128, torch.float32)()  # one decode step over a random cache
    a, b = bench_model._ours_decode(False)(i)(), bench_model._plain_decode(False)(i)()
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    kv = cfg.n_kv_heads * cfg.head_dim
    n = cfg.n_layers * (2 * cfg.dim**2 + 2 * cfg.dim * kv + 3 * cfg.dim * cfg.ffn_dim) + cfg.vocab_size * cfg.dim
    assert bench_model.matmul_params(cfg) == n


def test_plot_writes_one_png_per_family(cpu_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, js, _ = cpu_run
    doc = harness.load_json(js)
    paths = harness.plot(doc["env"], doc["rows"], tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{f}.png" for f in cli.FAMILIES)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


@pytest.mark.parametrize("docs", [None, [[40, 24], [64]]])
def test_attention_peers_compute_the_same_function(docs):
    """SDPA (math backend on CPU) on the bench's [B, H, S, D] copies, with the dense document mask, gives the
    project's output: the peers in a row really do the same work on the same inputs."""
    ctx = harness.Context(torch.device("cpu"))
    b = 1 if docs is None else 2
    i = bench_attention._inputs(ctx, b, 64, 4, 2, 32, False, docs)()
    for k in ("q", "k", "v", "qt", "kt", "vt"):
        i[k] = i[k].float()
    ours = bench_attention._ours(i)()
    theirs = bench_attention.sdpa("MATH")(i)()
    torch.testing.assert_close(theirs.transpose(1, 2), ours.view(theirs.transpose(1, 2).shape), atol=2e-5, rtol=1e-4)


def test_decode_peers_compute_the_same_function():
    from llama3_kernels.bench import bench_decode

    ctx = harness.Context(torch.device("cpu"))
    i = bench_decode._inputs(ctx, 3, 50, 4, 2, 32)()
    for k in ("q", "k", "v", "qt", "kt", "vt"):
        i[k] = i[k].float()
    ours = next(x for x in bench_decode.cases(ctx)[0].impls if x.ours).make(i)()
    theirs = bench_attention.sdpa("MATH", causal=False)(i)()
    torch.testing.assert_close(theirs.transpose(1, 2), ours, atol=2e-5, rtol=1e-4)


def test_compiled_peers_can_be_made_repeatedly():
    """Every compiled peer goes through harness.compiled; making a second one must not fail (it once did)."""
    first, second = harness.compiled(torch.sin), harness.compiled(torch.cos)
    assert callable(first) and callable(second)


def test_time_budget_skips_rows_it_cannot_reach():
    made = []
    case = harness.Case("t", "op", "fwd", "1", "bf16", lambda: made.append(1), [harness.Impl("x", lambda _: lambda: 0)])
    settings = harness.Settings(deadline=0.0)  # long past
    results = harness.run_case(case, harness.Timer(torch.device("cpu"), settings))
    assert not made and results[0].status == "skipped" and "time budget" in results[0].reason


def test_gemm_peer_computes_the_same_function():
    """torch._scaled_mm with [M, 1] and [1, N] scales (the cuBLASLt row-wise peer) equals the project's op."""
    i = bench_gemm._inputs(harness.Context(torch.device("cpu")), 37, 256, 512)()
    try:
        theirs = bench_gemm._scaled_mm(i)()
    except (RuntimeError, NotImplementedError) as e:  # CPU builds of torch without an fp8 _scaled_mm
        pytest.skip(f"torch._scaled_mm not available on CPU here: {e}")
    torch.testing.assert_close(theirs, bench_gemm._ours(i)())


def test_sanitize_cases_are_valid_calls():
    """The compute-sanitizer workload calls every op with valid arguments (run here on the CPU references),
    and names only launchers the op surface knows."""
    from llama3_kernels.bench import sanitize_cases
    from llama3_kernels.info import OP_KERNELS

    known = {name for names in OP_KERNELS.values() for name in names}
    cases = sanitize_cases._cases(torch.device("cpu"))
    assert {n for launchers, _ in cases.values() for n in launchers} == known  # every kernel is exercised
    for _, fn in cases.values():
        fn()
    assert set(bench_model.GRAPH_KERNELS) <= known


@pytest.mark.cuda
def test_gpu_quick_run_times_with_events(tmp_path):
    """On a GPU: a quick decode bench runs end to end, labelled with the GPU, our row timed, figures derived."""
    js = tmp_path / "gpu.json"
    assert cli.main(["--quick", "--device", "cuda", "--ops", "decode", "--no-progress", "--json", str(js)]) == 0
    doc = harness.load_json(js)
    assert doc["env"]["gpu"] == torch.cuda.get_device_name() and doc["env"]["driver"]
    for r in doc["rows"]:
        assert r["label"].startswith("GPU timing")
        ours = next(x for x in r["results"] if x["ours"])
        assert ours["status"] == "ok" and ours["ms"] > 0 and ours["tbps"] > 0, ours
        sdpa = next(x for x in r["results"] if x["impl"] == "SDPA flash")
        assert sdpa["status"] == "ok", sdpa


def _settings(**kw):
    return harness.Settings(warmup=1, min_reps=3, max_reps=3, budget_ms=1, **kw)


def test_nan_output_becomes_error_row_not_a_number():
    """An impl whose output holds NaN (or Inf, also inside a tuple or in fp8) is an error row, never timed."""
    x = torch.ones(5, 3)
    bad = x.clone()
    bad[3, 1] = float("nan")
    fp8 = getattr(torch, "float8_e4m3fn", None)
    impls = [
        harness.Impl(harness.OURS, lambda _: lambda: (x, [bad]), ours=True),
        harness.Impl("inf peer", lambda _: lambda: {"y": x / 0}),
        harness.Impl("fine peer", lambda _: lambda: (x, torch.arange(3))),
    ]
    if fp8 is not None:
        impls.append(harness.Impl("fp8 nan", lambda _: lambda: bad.to(fp8)))
    case = harness.Case("t", "op", "fwd", "1", "bf16", lambda: None, impls, bytes=10)
    by = {r.impl: r for r in harness.run_case(case, harness.Timer(torch.device("cpu"), _settings()))}
    assert by[harness.OURS].status == "error" and "output[1][0] (5, 3)" in by[harness.OURS].reason
    assert "NaN or Inf" in by["inf peer"].reason and by["inf peer"].ms is None and by["inf peer"].tbps is None
    assert by["fine peer"].status == "ok" and by["fine peer"].ms > 0
    if fp8 is not None:
        assert by["fp8 nan"].status == "error"


def test_compiled_impls_run_after_every_other_row():
    """Impls marked `compiles` run in a second pass; rows keep their impl order and every call is accounted for."""
    calls = []

    def impl(name, compiles=False):
        return harness.Impl(name, lambda _: lambda: calls.append(name), ours=name.startswith("ours"), compiles=compiles)

    cases = [
        harness.Case("t", f"op{i}", "fwd", "1", "bf16", lambda: None, [impl(f"ours{i}"), impl(f"comp{i}", True)])
        for i in range(3)
    ]
    seen = []
    rows = harness.run_cases(
        cases, torch.device("cpu"), _settings(), "label", progress=False, on_row=lambda r, i: seen.append((len(r), i))
    )
    order = list(dict.fromkeys(calls))
    assert order == ["ours0", "ours1", "ours2", "comp0", "comp1", "comp2"]
    assert [[x["impl"] for x in r["results"]] for r in rows] == [[f"ours{i}", f"comp{i}"] for i in range(3)]
    assert all(x["status"] == "ok" for r in rows for x in r["results"])
    assert seen[:3] == [(1, 0), (2, 1), (3, 2)] and seen[-1] == (3, None)  # after every row, and at the end
    skipped = harness.run_cases(cases, torch.device("cpu"), _settings(run_compiled=False), "label", progress=False)
    comp = [x for r in skipped for x in r["results"] if x["impl"].startswith("comp")]
    assert all(x["status"] == "skipped" and "--no-compiled" in x["reason"] for x in comp)


def test_impl_past_its_cap_is_abandoned_and_the_next_one_runs():
    import time as _time

    case = harness.Case("t", "op", "fwd", "1", "bf16", lambda: None, [
        harness.Impl("slow compile", lambda _: _time.sleep(30) or (lambda: None), compiles=True),
        harness.Impl(harness.OURS, lambda _: lambda: None, ours=True),
    ])  # fmt: skip
    t0 = _time.monotonic()
    rows = harness.run_cases([case], torch.device("cpu"), _settings(impl_timeout_s=0.5), "label", progress=False)
    by = {x["impl"]: x for x in rows[0]["results"]}
    assert _time.monotonic() - t0 < 10
    assert by["slow compile"]["status"] == "error" and "abandoned after" in by["slow compile"]["reason"]
    assert by[harness.OURS]["status"] == "ok"


def test_lost_cuda_context_skips_the_rest(monkeypatch):
    """After a sticky CUDA error the run stops timing: every later impl says why instead of failing slowly."""

    def broken(device):  # the first row's kernel faulted
        return "CUDA error: an illegal memory access was encountered"

    monkeypatch.setattr(harness, "cuda_broken", broken)
    made = []
    cases = [
        harness.Case("t", f"op{i}", "fwd", "1", "bf16", lambda: made.append(1), [
            harness.Impl(harness.OURS, lambda _: lambda: None, ours=True),
            harness.Impl("compiled", lambda _: lambda: None, compiles=True),
        ])
        for i in range(3)
    ]  # fmt: skip
    rows = harness.run_cases(cases, torch.device("cpu"), _settings(), "label", progress=False)
    assert len(made) == 1 and rows[0]["results"][0]["status"] == "ok"
    later = [x for r in rows for x in r["results"]][1:]
    assert all(x["status"] == "skipped" and "CUDA context lost" in x["reason"] for x in later)
    monkeypatch.undo()  # the real check answers None on a CPU
    assert harness.cuda_broken(torch.device("cpu")) is None


def test_partial_results_file_is_valid_and_says_so(tmp_path):
    """What the bench writes after each row is a results file `--compare` can read, marked incomplete."""
    js, md = tmp_path / "p.json", tmp_path / "p.md"
    args = cli.build_parser().parse_args(["--json", str(js), "--markdown", str(md)])
    env = {"device": "cpu", "cpu": "x", "complete": False}
    row = {"key": "k", "family": "f", "op": "o", "mode": "m", "shape": "s", "results": [], "formula": "",
           "best_peer": None, "speedup_vs_best_peer": None}  # fmt: skip
    cli._write(args, env, [row], {})
    assert harness.load_json(js)["env"]["complete"] is False and not list(tmp_path.glob("*.tmp"))
    assert "Partial results" in md.read_text()


def test_commit_stamp_when_git_is_missing(monkeypatch):
    """On the device machine the tree has no .git: the commit comes from L3K_COMMIT (.whl/COMMIT's stamp)."""

    def no_git(*a, **k):
        raise OSError("git: not found")

    monkeypatch.setattr(harness.subprocess, "run", no_git)
    monkeypatch.setenv("L3K_COMMIT", "0123456789abcdef dirty")
    assert harness._git_commit() == {"commit": "0123456789abcdef", "dirty": True}
    monkeypatch.setenv("L3K_COMMIT", "")
    assert harness._git_commit() == {"commit": "unknown", "dirty": None}


def test_commit_stamp_wins_over_git(monkeypatch):
    """The stamp names the tree that was sent; the device box's copy of .git was seen naming an older commit."""
    monkeypatch.setenv("L3K_COMMIT", "fedcba9876543210")
    assert harness._git_commit() == {"commit": "fedcba9876543210", "dirty": False}
    monkeypatch.setenv("L3K_COMMIT", "0123abcd dirty")
    assert harness._git_commit() == {"commit": "0123abcd", "dirty": True}


def test_sanitizer_families_cover_every_case_once():
    from llama3_kernels.bench import sanitize_cases

    names = list(sanitize_cases._cases(torch.device("cpu")))
    grouped = [n for fam in sanitize_cases.FAMILIES.values() for n in fam]
    assert sorted(grouped) == sorted(names)
    assert {n for fam in sanitize_cases.RACECHECK.values() for n in fam} <= set(names)
    assert sanitize_cases.main(["--sanitize", "helgrind"]) == 2


def test_env_set_restores(monkeypatch):
    """The opt-in kernels' switches are set for the call only: an unset variable is unset again, a set one keeps
    its value, also when the call raises."""
    import os

    monkeypatch.delenv("L3K_FLASH_FWD_SM90", raising=False)
    monkeypatch.setenv("L3K_FLASH_BWD_SM90", "0")
    with pytest.raises(RuntimeError), harness.env_set({"L3K_FLASH_FWD_SM90": "1", "L3K_FLASH_BWD_SM90": "1"}):
        assert os.environ["L3K_FLASH_FWD_SM90"] == os.environ["L3K_FLASH_BWD_SM90"] == "1"
        raise RuntimeError("the call failed")
    assert "L3K_FLASH_FWD_SM90" not in os.environ and os.environ["L3K_FLASH_BWD_SM90"] == "0"
    with harness.env_set(None):  # no variables: nothing changes
        pass


def test_profile_step_cpu_plumbing(capsys):
    """bench/profile_step.py (the device check's trace phase) on the CPU: every section with its kernel groups."""
    from llama3_kernels.bench import profile_step

    profile_step.main(["--cpu", "--top", "3"])
    out = capsys.readouterr().out
    for title in ("train step ours", "train step plain", "decode step ours", "decode step plain"):
        assert f"== {title}" in out
    assert "gemm" in out and "attention" in out
