"""Peak coordinates: name parsing and overlap matching against brute force."""

from __future__ import annotations

import numpy as np

from hitanno_cli.genome import Intervals, overlap_pairs, parse_peak_name, peak_intervals


def test_parse_peak_names() -> None:
    assert parse_peak_name("chr1:100-200") == ("chr1", 100, 200)
    assert parse_peak_name("chr1_100_200") == ("chr1", 100, 200)
    assert parse_peak_name("chrUn_gl000220_5_90") == ("chrUn_gl000220", 5, 90)
    assert parse_peak_name("chrX-100-200") is None
    assert parse_peak_name("ENSG0001") is None
    assert parse_peak_name("chr1:200-100") is None


def test_intervals_from_names_mark_unknown() -> None:
    iv = peak_intervals(np.array(["chr2:5-9", "gene"]))
    assert iv.chrom[0] == "chr2" and iv.start.tolist() == [5, -1] and iv.known.tolist() == [True, False]


def _random_intervals(rng: np.random.Generator, n: int) -> Intervals:
    chrom = rng.choice(["chr1", "chr2", "chr3"], size=n).astype(object)
    start = rng.integers(0, 5000, size=n)
    end = start + rng.integers(1, 400, size=n)
    return Intervals(chrom, start.astype(np.int64), end.astype(np.int64))


def test_overlap_pairs_equal_brute_force() -> None:
    rng = np.random.default_rng(3)
    query, target = _random_intervals(rng, 300), _random_intervals(rng, 200)
    q, t = overlap_pairs(query, target)
    found = set(zip(q.tolist(), t.tolist()))
    expected = {
        (i, j)
        for i in range(len(query))
        for j in range(len(target))
        if query.chrom[i] == target.chrom[j] and query.start[i] < target.end[j] and target.start[j] < query.end[i]
    }
    assert found == expected and len(q) == len(found)


def test_touching_intervals_do_not_overlap() -> None:
    a = Intervals(np.array(["chr1"], object), np.array([0]), np.array([100]))
    b = Intervals(np.array(["chr1"], object), np.array([100]), np.array([200]))
    assert overlap_pairs(a, b)[0].size == 0
