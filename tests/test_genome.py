"""Peak coordinates: name parsing, chromosome keys and overlap matching against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from hitanno_cli.genome import Intervals, canonical_chrom, overlap_pairs, parse_peak_name, peak_intervals


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("chr1:100-200", ("chr1", 100, 200)),
        ("chr1_100_200", ("chr1", 100, 200)),
        ("chr1-100-200", ("chr1", 100, 200)),
        ("chr1:100_200", ("chr1", 100, 200)),
        ("1:100-200", ("1", 100, 200)),
        ("X-100-200", ("X", 100, 200)),
        ("MT_5_90", ("MT", 5, 90)),
        (" chr2:5-9 ", ("chr2", 5, 9)),
        ("chrUn_gl000220_5_90", ("chrUn_gl000220", 5, 90)),
        ("chrUn_KI270302v1-5-90", ("chrUn_KI270302v1", 5, 90)),
        ("chr1_KI270706v1_random:5-90", ("chr1_KI270706v1_random", 5, 90)),
        ("HLA-A*01:01:01:01:5-90", ("HLA-A*01:01:01:01", 5, 90)),
        ("GL000220.1:5-90", ("GL000220.1", 5, 90)),
        ("chr1_2_100_200", ("chr1_2", 100, 200)),  # the last two integer fields are start and end
    ],
)
def test_parse_peak_name_styles(name: str, parsed: tuple[str, int, int]) -> None:
    assert parse_peak_name(name) == parsed


@pytest.mark.parametrize(
    "name",
    [
        "foo",
        "ENSG0001",
        "chr1:200-100",  # end before start
        "chr1:100-100",  # empty
        "chr1:abc-def",
        "chr1:100",
        ":100-200",
        "-100-200",
        "chr1:-100-200",  # negative start
        "chr1__100_200",  # chromosome ending in a separator
        "chr1:100-200-300",  # a ':' inside the chromosome needs ':' before the start
        "chr1:100:200",
        "chr 1:100-200",
        "chr1:100-99999999999999999999",  # beyond int64
        "",
    ],
)
def test_parse_peak_name_refuses_garbage(name: str) -> None:
    assert parse_peak_name(name) is None


def test_canonical_chromosomes_match_ucsc_and_ensembl() -> None:
    assert canonical_chrom("chr1") == canonical_chrom("1") == "1"
    assert canonical_chrom("chrX") == canonical_chrom("X") and canonical_chrom("chrY") == canonical_chrom("Y")
    assert canonical_chrom("chrM") == canonical_chrom("MT") == canonical_chrom("M") == canonical_chrom("chrMT")
    assert canonical_chrom("Chr2") == "2"  # plant genomes capitalise it
    assert canonical_chrom("chr1") != canonical_chrom("chr10") and canonical_chrom("chr1") != canonical_chrom("X")
    assert canonical_chrom("chrUn_KI270302v1") == "Un_KI270302v1" and canonical_chrom("chr") == "chr"


def test_intervals_from_names_mark_unknown() -> None:
    iv = peak_intervals(np.array(["chr2:5-9", "gene"]))
    assert iv.chrom[0] == "chr2" and iv.start.tolist() == [5, -1] and iv.known.tolist() == [True, False]


def test_intervals_from_names_keep_chromosomes_as_written() -> None:
    iv = peak_intervals(np.array(["1:5-9", "chrX-10-20", "MT_1_4"]))
    assert iv.chrom.tolist() == ["1", "chrX", "MT"] and iv.end.tolist() == [9, 20, 4]


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


def test_overlap_across_chromosome_naming_styles() -> None:
    ucsc = Intervals(
        np.array(["chr1", "chrX", "chrM", "chr2"], object), np.array([100, 0, 10, 0]), np.array([200, 50, 20, 9])
    )
    ensembl = Intervals(np.array(["1", "X", "MT", "10"], object), np.array([150, 40, 0, 0]), np.array([160, 45, 11, 9]))
    q, t = overlap_pairs(ensembl, ucsc)
    assert sorted(zip(q.tolist(), t.tolist())) == [(0, 0), (1, 1), (2, 2)]  # chr2 does not meet 10
    q, t = overlap_pairs(ucsc, ensembl)  # and back
    assert sorted(zip(q.tolist(), t.tolist())) == [(0, 0), (1, 1), (2, 2)]


def test_overlap_pairs_with_mixed_styles_equal_brute_force() -> None:
    rng = np.random.default_rng(5)
    query, target = _random_intervals(rng, 300), _random_intervals(rng, 200)
    plain = np.array([c[3:] if rng.random() < 0.5 else c for c in query.chrom], dtype=object)
    q, t = overlap_pairs(Intervals(plain, query.start, query.end), target)
    assert set(zip(q.tolist(), t.tolist())) == set(zip(*map(np.ndarray.tolist, overlap_pairs(query, target))))
