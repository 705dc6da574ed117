"""The `brainkern` command: info and bench run and say what they should."""

import pytest

from brainkern import bench, cli


def test_info_names_backends_and_versions(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for needle in ("brainkern 0.1.0", "torch", "numba", "native core", "GPU:", "available backends"):
        assert needle in text


def test_bench_linear_prints_a_table(monkeypatch, tmp_path, capsys):
    # Only that it runs and reports every implementation: speed itself is never asserted here.
    def run_once(impls, **_):
        for impl in impls.values():
            with bench._backend_of(impl):
                impl.fn()
        return dict.fromkeys(impls, 1e-3)

    monkeypatch.setattr(bench, "time_impls", run_once)
    out = tmp_path / "table.md"
    assert cli.main(["bench", "linear", "--sizes", "32", "--batches", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for impl in bench.cpu_backends() + ["torch.mm (MKL)", "torch eager"]:
        assert f"| {impl} |" in text
    assert "gemm 32^3 fwd+bwd" in text and "linear 4x784->128+relu fwd+bwd" in text
    assert "mlp 4x784-128-10 fwd+bwd" in text
    assert out.read_text().startswith("# brainkern bench linear")


def test_bench_rejects_unknown_op():
    with pytest.raises(SystemExit):
        cli.main(["bench", "conv9d"])


def test_bench_conv_and_pool_print_tables(monkeypatch, capsys):
    from brainkern import bench_conv

    def run_once(impls, **_):
        for impl in impls.values():
            with bench._backend_of(impl):
                impl.fn()
        return dict.fromkeys(impls, 1e-3)

    tiny = [bench_conv.ConvCase("cnn tiny conv", 2, 3, 4, 3, 1, 1, 6),
            bench_conv.ConvCase("tiny up", 2, 4, 2, 4, 2, 1, 3, transposed=True,
                                activation="tanh")]
    monkeypatch.setattr(bench_conv, "time_impls", run_once)
    monkeypatch.setattr(bench_conv, "CNN_CASES", tiny[:1])
    monkeypatch.setattr(bench_conv, "RESNET_CASES", tiny[:1])
    monkeypatch.setattr(bench_conv, "DCGAN_CASES", tiny[1:])
    monkeypatch.setattr(bench_conv, "POOL_CASES", [("max 2x2", (2, 3, 8, 8)),
                                                   ("avg 2x2", (2, 3, 8, 8))])
    assert cli.main(["bench", "conv"]) == 0
    text = capsys.readouterr().out
    for impl in ("torch eager", "torch eager channels_last",
                 *(f"{b} {layout}" for b in bench.cpu_backends()
                   for layout in ("NCHW", "channels_last"))):
        assert f"| {impl} |" in text
    for case in ("cnn tiny conv b2 fwd+bwd", "tiny up b2 fwd", "cnn conv layers (sum) fwd+bwd",
                 "dcgan generator (sum) fwd", "cnn block tiny conv +relu+maxpool2 b2 fwd+bwd"):
        assert case in text
    for backend in bench.cpu_backends():
        assert f"| {backend} fused channels_last |" in text
        assert f"| {backend} unfused NCHW |" in text
    monkeypatch.setattr(bench_conv, "COVERAGE_CASES", [
        bench_conv.ConvCase("tiny grouped", 2, 4, 8, 3, 1, 1, 5, groups=4)])
    assert cli.main(["bench", "conv", "--groups", "coverage"]) == 0
    assert "| tiny grouped b2 fwd+bwd | torch eager channels_last |" in capsys.readouterr().out
    assert cli.main(["bench", "conv", "--groups", "kernels"]) == 0
    text = capsys.readouterr().out
    assert "| cnn tiny conv b2 channels_last kernels | torch aten bwd (x, w, b) |" in text
    for backend in bench.cpu_backends():
        for kernel in ("fwd", "act bwd (no FLOPs)", "dx", "dw"):
            assert f"| tiny up b2 NCHW kernels | {backend} {kernel} |" in text
    assert cli.main(["bench", "pool"]) == 0
    text = capsys.readouterr().out
    assert "max 2x2 (2, 3, 8, 8) fwd+bwd" in text and "GB/s" in text
