"""Version schemes: total order within each scheme, refusal across schemes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from corral.domain.errors import IncomparableVersions
from corral.domain.versions import InvalidVersion, Scheme, compare, is_downgrade, parse_version

# -- strategies ---------------------------------------------------------------------------

nums = st.integers(0, 10**6)
alnum_ident = st.from_regex(r"[A-Za-z-][0-9A-Za-z-]{0,6}", fullmatch=True)
num_ident = st.integers(0, 10**4).map(str)
pre = st.lists(st.one_of(alnum_ident, num_ident), min_size=1, max_size=4).map(".".join)
release = st.builds(
    lambda a, b, c, p: f"{a}.{b}.{c}" + (f"-{p}" if p else ""),
    nums,
    nums,
    nums,
    st.one_of(st.none(), pre),
)
channel_name = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
channel = st.builds(lambda ch, n: f"{ch}.{n}", channel_name, st.integers(0, 10**12))
main_channel = st.integers(0, 10**12).map(lambda n: f"main.{n}")


def cmp(a: str, b: str) -> int:
    return compare(a, b)


# -- total order within a scheme -----------------------------------------------------------


@pytest.mark.parametrize("versions", [release, main_channel], ids=["release", "channel"])
@given(data=st.data())
def test_total_order_within_a_scheme(versions, data):
    a, b, c = (data.draw(versions) for _ in range(3))
    # reflexive and antisymmetric
    assert cmp(a, a) == 0
    assert cmp(a, b) == -cmp(b, a)
    # total: exactly one of <, =, > (equal only for the same version)
    assert cmp(a, b) in (-1, 0, 1)
    if cmp(a, b) == 0:
        assert parse_version(a).key == parse_version(b).key
    # transitive
    if cmp(a, b) <= 0 and cmp(b, c) <= 0:
        assert cmp(a, c) <= 0


@given(st.lists(release, min_size=2, max_size=12))
def test_sorting_releases_is_consistent(vs):
    from functools import cmp_to_key

    ordered = sorted(vs, key=cmp_to_key(cmp))
    for x, y in itertools.pairwise(ordered):
        assert cmp(x, y) <= 0


def test_semver_precedence_examples():
    chain = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.1.0",
        "2.0.0",
        "10.0.0",
    ]
    for lo, hi in itertools.pairwise(chain):
        assert cmp(lo, hi) == -1, (lo, hi)
    assert cmp("0.20.23", "0.20.18") == 1
    assert cmp("v1.2.3", "1.2.3") == 0


def test_channel_builds_order_by_number_not_text():
    assert cmp("main.9", "main.10") == -1
    assert cmp("main.27305", "main.150") == 1


# -- refusals ------------------------------------------------------------------------------


@given(release, channel)
def test_release_and_channel_never_compare(r, c):
    with pytest.raises(IncomparableVersions):
        cmp(r, c)
    with pytest.raises(IncomparableVersions):
        cmp(c, r)


@given(channel_name, channel_name, st.integers(0, 99), st.integers(0, 99))
def test_different_channels_never_compare(c1, c2, n1, n2):
    assume(c1 != c2)
    with pytest.raises(IncomparableVersions, match="different channels"):
        cmp(f"{c1}.{n1}", f"{c2}.{n2}")


def test_dev_builds_have_no_order():
    assert cmp("dev", "dev") == 0
    for other in ("dev-x", "1.0.0", "main.3"):
        with pytest.raises(IncomparableVersions):
            cmp("dev", other)


@pytest.mark.parametrize(
    "text",
    [
        "27305",
        "1.2",
        "1.2.3.4",
        "01.2.3",
        "1.2.3+build.5",
        "latest",
        "",
        "1.0.0-01",
        "Main.3",
        "main.-1",
    ],
)
def test_invalid_versions_are_refused_with_a_reason(text):
    with pytest.raises(InvalidVersion) as exc:
        parse_version(text)
    assert str(exc.value)


def test_bare_build_number_is_refused_with_a_hint():
    with pytest.raises(InvalidVersion, match=r"main\.27305"):
        parse_version("27305")


def test_schemes_are_recognised():
    assert parse_version("1.2.3-rc.1").scheme is Scheme.RELEASE
    assert parse_version("nightly.12").scheme is Scheme.CHANNEL
    assert parse_version("dev-feature").scheme is Scheme.DEV


def test_is_downgrade():
    assert is_downgrade("1.2.0", "1.1.0")
    assert not is_downgrade("1.1.0", "1.2.0")
    assert not is_downgrade("1.2.0", "1.2.0")
    assert not is_downgrade(None, "1.0.0")
    with pytest.raises(IncomparableVersions):
        is_downgrade("main.5", "1.0.0")
