"""The report as a person sees it: headless Chromium renders report.html to a PNG."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from matplotlib import image as mpimg


def _chromium() -> str:
    """Debian's chromium, installed here when missing (root with apt-get), else skip."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            check=True,
            capture_output=True,
            timeout=600,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
    except (subprocess.SubprocessError, OSError) as err:
        pytest.skip(f"could not install Debian's chromium: {err}")
    return shutil.which("chromium") or pytest.skip("chromium install did not provide /usr/bin/chromium")


@pytest.mark.slow
def test_report_screenshot_shows_heatmap_and_table(tmp_path) -> None:
    import anndata as ad

    rng = np.random.default_rng(1)
    classes = ["B", "T", "NK", "Mono", "DC"]
    truth = rng.choice(classes, size=300)
    pred = np.where(rng.random(300) < 0.75, truth, rng.choice(classes, size=300))
    ids = [f"c{i}" for i in range(300)]
    (tmp_path / "pred").mkdir()
    pd.DataFrame({"cell_id": ids, "predicted": pred}).to_csv(tmp_path / "pred" / "predictions.csv", index=False)
    ad.AnnData(X=np.zeros((300, 2), np.float32), obs=pd.DataFrame({"t": truth}, index=ids)).write_h5ad(
        tmp_path / "q.h5ad"
    )
    out = tmp_path / "report"
    assert (
        run_cli(
            "evaluate",
            "--predictions",
            str(tmp_path / "pred" / "predictions.csv"),
            "--truth",
            str(tmp_path / "q.h5ad"),
            "-l",
            "t",
            "-o",
            str(out),
            "-q",
        ).exit_code
        == 0
    )
    shot = tmp_path / "shot.png"
    chromium = _chromium()
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1100,1400",
        f"--screenshot={shot}",
        (out / "report.html").as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    pixels = mpimg.imread(shot)[..., :3]
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    heatmap_blue = (blue > 0.5) & (blue - red > 0.3)  # matplotlib's "Blues" cells
    table_lines = (np.abs(red - 0.8) < 0.03) & (np.abs(green - 0.8) < 0.03) & (np.abs(blue - 0.8) < 0.03)
    dark_text = pixels.max(axis=2) < 0.25
    assert heatmap_blue.sum() > 5000, "no heatmap in the rendered page"
    assert table_lines.sum() > 500, "no table borders in the rendered page"
    assert dark_text.sum() > 2000, "no text in the rendered page"
