"""Smoke test of ``python -m fusedaccum demo`` (one epoch)."""

import io

import pytest

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install 'fusedaccum[demo]')")
pytest.importorskip("matplotlib", reason="the demo needs matplotlib (pip install 'fusedaccum[demo]')")

from fusedaccum import demo  # noqa: E402
from fusedaccum.__main__ import main  # noqa: E402


def test_demo_one_epoch(backend, device, tmp_path):
    out = tmp_path / "curves.png"
    stream = io.StringIO()
    rows = demo.run(epochs=1, device=device, out=str(out), stream=stream)
    text = stream.getvalue()
    assert out.stat().st_size > 10_000
    assert f"plot saved to {out}" in text
    for label in ("large batch (128)", "GradAccumulator (K=8)", "naive loop (mean / K)"):
        assert label in text
    by_name = {r["method"]: r for r in rows}
    assert by_name["large batch"]["max_diff"] == 0.0
    assert by_name["GradAccumulator"]["max_diff"] < 1e-4  # fp32 rounding only
    assert by_name["naive loop"]["max_diff"] > 100 * by_name["GradAccumulator"]["max_diff"]
    assert all(r["peak"] is None or r["peak"] > 0 for r in rows)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert main(["demo", "--epochs", "1", "--micro-batches", "4", "--window", "256", "--out", str(out)]) == 0
    assert "GradAccumulator (K=4)" in capsys.readouterr().out and out.exists()
    with pytest.raises(SystemExit):
        main(["demo", "--micro-batches", "0"])
