"""The shard reader's own tar parsing (memory map, plain headers parsed directly) against tarfile.

Every case is a real tar written by tarfile in one of its formats, or damaged on disk; the oracle is
tarfile reading the same file sequentially (what the reader did before it parsed headers itself):
the same members, the same bytes, and damage found at the same place.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from data_tools.errors import BadSample
from data_tools.shard_reader import ShardReader, _MappedTarMembers, _open_members


def _write(path: Path, members: list[tuple[str, bytes | None]], fmt=tarfile.USTAR_FORMAT, pax_headers=None) -> Path:
    """members: (name, data) for regular files, (name/, None) for directories, (name, None) for a symlink."""
    with tarfile.open(path, "w", format=fmt, pax_headers=pax_headers or {}) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if data is None and name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _tarfile_members(path: Path) -> tuple[list[tuple[str, bytes]], str | None]:
    """The oracle: regular members in order and the error that stopped reading (its type), if any."""
    out: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                if info.isreg():
                    out.append((info.name, tar.extractfile(info).read()))
    except (tarfile.TarError, EOFError, OSError) as err:
        return out, type(err).__name__
    return out, None


def _reader_members(path: Path) -> tuple[list[tuple[str, bytes]], str | None]:
    out: list[tuple[str, bytes]] = []
    try:
        members, stream = _open_members(str(path))
    except (tarfile.TarError, OSError, ValueError) as err:
        return out, type(err).__name__
    try:
        while (member := members.next()) is not None:
            out.append((member[0], members.read(member[1])))
    except (tarfile.TarError, EOFError, OSError) as err:
        return out, type(err).__name__
    finally:
        members.close()
        stream.close()
    return out, None


def _samples(n: int, prefix: str = "") -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        out += [(f"{prefix}s{i:03d}.jpg", bytes([i]) * (100 + 700 * i)), (f"{prefix}s{i:03d}.json", b'{"i": %d}' % i)]
    return out


LONG = "d" * 120 + "/"


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"]
)
def test_members_and_bytes_equal_tarfiles_in_every_format(tmp_path, fmt):
    members = _samples(3) + [("dir/", None), ("link.txt", None)] + _samples(2, "sub/")
    if fmt != tarfile.USTAR_FORMAT:  # names ustar cannot hold: GNU long-name and pax records, read by tarfile
        members += _samples(2, LONG) + [("caf\u00e9/s900.txt", b"unicode")]
    path = _write(tmp_path / "a.tar", members, fmt)
    expected = _tarfile_members(path)
    assert expected[1] is None and len(expected[0]) == len([m for m in members if m[1] is not None])
    assert _reader_members(path) == expected
    assert isinstance(_open_members(str(path))[0], _MappedTarMembers)


def test_a_pax_global_header_hands_the_rest_to_tarfile(tmp_path):
    path = _write(tmp_path / "g.tar", _samples(3), tarfile.PAX_FORMAT, pax_headers={"comment": "made by git archive"})
    assert _reader_members(path) == _tarfile_members(path)


def test_ustar_prefix_and_old_style_directories(tmp_path):
    deep = "p" * 90 + "/" + "q" * 60 + "/"  # over 100 characters: ustar splits it into prefix and name
    path = _write(tmp_path / "u.tar", _samples(2, deep) + [("olddir/", None)], tarfile.USTAR_FORMAT)
    raw = bytearray(path.read_bytes())
    # Rewrite the directory's type to '\0' (pre-POSIX): tarfile calls it a directory by its trailing slash.
    offset = raw.find(b"olddir/")
    raw[offset + 156] = 0
    checksum = sum(raw[offset : offset + 148]) + 8 * 32 + sum(raw[offset + 156 : offset + 512])
    raw[offset + 148 : offset + 156] = b"%06o\0 " % checksum
    path.write_bytes(bytes(raw))
    expected = _tarfile_members(path)
    assert [name for name, _ in expected[0]] == [
        f"{deep}s000.jpg",
        f"{deep}s000.json",
        f"{deep}s001.jpg",
        f"{deep}s001.json",
    ]
    assert _reader_members(path) == expected


@pytest.mark.parametrize("damage", ["truncated_data", "truncated_header", "bad_checksum", "garbage", "empty", "zeros"])
def test_damage_is_found_where_tarfile_finds_it(tmp_path, damage):
    path = _write(tmp_path / "d.tar", _samples(4))
    raw = bytearray(path.read_bytes())
    third = raw.find(b"s002.jpg")  # the third sample's header
    if damage == "truncated_data":
        raw = raw[: third + 512 + 300]
    elif damage == "truncated_header":
        raw = raw[: third + 200]
    elif damage == "bad_checksum":
        raw[third + 130] ^= 1
    elif damage == "garbage":
        raw = bytearray(b"not a tar at all" * 100)
    elif damage == "empty":
        raw = bytearray()
    else:
        raw = bytearray(2048)
    path.write_bytes(bytes(raw))
    expected = _tarfile_members(path)
    got = _reader_members(path)
    assert got[0] == expected[0]
    assert (got[1] is None) == (expected[1] is None), (got[1], expected[1])
    if damage in ("truncated_data", "bad_checksum", "truncated_header"):
        assert [name for name, _ in got[0]][:4] == ["s000.jpg", "s000.json", "s001.jpg", "s001.json"]


def test_reader_delivers_samples_and_names_the_damage(tmp_path):
    path = _write(tmp_path / "r.tar", _samples(4))
    reader = ShardReader([str(path)])
    assert [reader.fetch(0, i)["__key__"] for i in (0, 2, 3)] == ["s000", "s002", "s003"]  # skipping s001 by header
    assert reader.fetch(0, 1)["jpg"] == bytes([1]) * 800  # backwards: reopens
    with pytest.raises(BadSample, match="ends before sample 4"):
        reader.fetch(0, 4)
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.find(b"s002.jpg") + 512 + 300])
    reader = ShardReader([str(path)])
    assert reader.fetch(0, 1)["json"] == b'{"i": 1}'
    with pytest.raises(BadSample, match="unexpected end of data") as bad:
        reader.fetch(0, 2)
    assert bad.value.reason == "decode_error"
    reader.close()


def test_compressed_shards_go_through_tarfile(tmp_path):
    plain = _write(tmp_path / "c.tar", _samples(3))
    packed = tmp_path / "c.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert _reader_members(packed) == _tarfile_members(plain)
    reader = ShardReader([str(packed)])
    assert reader.fetch(0, 2)["json"] == b'{"i": 2}'
