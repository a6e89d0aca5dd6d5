"""What a dataset folder may make this code do: the one gate between the shard locations a
`dataset.json` lists and the code that opens them (docs/trust.md has the whole table).

A dataset folder is untrusted input (DESIGN.md 3): somebody else may have written it, and nothing in
it may run code or send requests the user did not ask for. Its `dataset.json` lists each shard's
location as one of four kinds (`location_kind`):

- `path`: relative to the folder or absolute; opened and read as bytes, never executed. Allowed.
- `file`: a `file://` URL, the same as an absolute path. Allowed.
- `url`: any other `scheme://...` (http(s), gs, hf, ...): fetched from the host it names. Allowed
  only when it starts with a prefix the user gave (`data.remote_allow`, `--allow-remote PREFIX`);
  none by default, since otherwise a data file could make every reader send requests to any host
  the machine reaches (internal services included).
- `pipe`: `pipe:CMD`, a shell command (webdataset's gopen runs it). Run only for a folder the user
  named: `data.allow_pipe_from=[DIR]` in the config, or `--allow-pipe` for the folders on that
  command line; never because a `dataset.json` says so.

Every reader resolves locations through `shard_locations` (DatasetInfo.locations), which checks
all shards of a dataset before any is opened: a refused one is one UserError line naming the
dataset file, the shard, the location and the opt-in, exit code 3 (data). Locations that pass come
back as `Allowed` strings, and `data_tools.remote.open_shard` (the only code that fetches a URL or
runs a command) refuses anything else, so a reader that skipped the gate fails instead of running it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Iterable, Literal
from urllib.parse import urlsplit

from data_tools.errors import ExitCode, UserError

PIPE_PREFIX = "pipe:"
LOCAL_SCHEMES = ("file",)
"""URL schemes that name a local file (read like a path, no host involved)."""


class Allowed(str):
    """A resolved shard location that passed `check_location` (pickles as itself to loader workers)."""

    __slots__ = ()


def location_kind(location: str) -> Literal["path", "file", "url", "pipe"]:
    """The kind of a shard location, as the readers open it: `pipe:` (any case) runs a command,
    `scheme://...` is fetched, anything else (`/data/a://b.tar` too) is a local path."""
    if location[: len(PIPE_PREFIX)].lower() == PIPE_PREFIX:
        return "pipe"
    scheme = urlsplit(location).scheme.lower() if "://" in location else ""
    if not scheme or not location.lower().startswith(scheme + "://"):
        return "path"
    return "file" if scheme in LOCAL_SCHEMES else "url"


def is_local(location: str) -> bool:
    """A plain file path (opened with `open`, memory-mapped); everything else streams."""
    return location_kind(location) == "path"


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot be a remote prefix (None: it can): it must be `scheme://host[/path]`."""
    if not isinstance(prefix, str) or location_kind(prefix) != "url":
        return "a URL prefix scheme://host/... (e.g. https://bucket.example.org/data/)"
    parts = urlsplit(prefix)
    if not parts.netloc or "@" in parts.netloc:
        return "a URL prefix with a host and no user part (e.g. https://bucket.example.org/data/)"
    return None


def url_allowed(location: str, prefix: str) -> bool:
    """`location` lies under `prefix`: the same scheme and host (exactly: `https://a.org` does not
    allow `https://a.org.evil.net`), and a path at or below the prefix's path, whole segments only,
    with no `..` segment that could climb out of it."""
    loc, pre = urlsplit(location), urlsplit(prefix)
    if (loc.scheme.lower(), loc.netloc.lower()) != (pre.scheme.lower(), pre.netloc.lower()):
        return False
    if ".." in loc.path.split("/"):
        return False
    base = pre.path.rstrip("/")
    return not base or loc.path == base or loc.path.startswith(base + "/")


def suggested_prefix(location: str) -> str:
    """The host part of a URL, as a prefix to allow (`https://host/`)."""
    parts = urlsplit(location)
    return f"{parts.scheme}://{parts.netloc}/"


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


@dataclasses.dataclass(frozen=True)
class Trust:
    """What the user allowed on their own command line or in their own config (never a data file)."""

    pipe_folders: tuple[str, ...] = ()
    """Dataset folders whose `pipe:` locations may run (compared as real paths)."""
    remote_prefixes: tuple[str, ...] = ()
    """URL prefixes that a dataset.json's URLs may start with."""
    via: Literal["config", "cli"] = "config"
    """Where the opt-in is given: the refusal names `data.*` fields or `--allow-*` flags."""

    def __post_init__(self) -> None:
        for prefix in self.remote_prefixes:
            problem = prefix_problem(prefix)
            if problem is not None:
                field = "data.remote_allow" if self.via == "config" else "--allow-remote"
                raise UserError(f"{field}: {prefix!r} is not allowed: expected {problem}")

    @classmethod
    def for_command(
        cls, folders: Iterable[str | os.PathLike], allow_pipe: bool, remote_prefixes: Iterable[str] | None
    ) -> "Trust":
        """A data_tools command's opt-ins: `--allow-pipe` covers the folders named on its command line."""
        return cls(tuple(str(f) for f in folders) if allow_pipe else (), tuple(remote_prefixes or ()), "cli")

    def allows_pipe(self, folder: str | os.PathLike) -> bool:
        return any(_same_folder(folder, allowed) for allowed in self.pipe_folders)

    def allows_url(self, location: str) -> bool:
        return any(url_allowed(location, prefix) for prefix in self.remote_prefixes)

    def pipe_opt_in(self, folder: str | os.PathLike) -> str:
        return "--allow-pipe" if self.via == "cli" else f"data.allow_pipe_from=[{folder}]"

    def url_opt_in(self, location: str) -> str:
        prefix = suggested_prefix(location)
        return f"--allow-remote {prefix}" if self.via == "cli" else f"data.remote_allow=[{prefix}]"


NOTHING = Trust()
"""No opt-in: local paths only (the default of every reader)."""


def add_trust_arguments(parser: argparse.ArgumentParser) -> None:
    """The opt-ins of a command that reads datasets (off by default)."""
    group = parser.add_argument_group("shard locations that are not local files (docs/trust.md)")
    group.add_argument(
        "--allow-pipe",
        action="store_true",
        help="run the `pipe:` shard commands of the dataset folder(s) named here (trusted folders only)",
    )
    group.add_argument(
        "--allow-remote",
        action="append",
        default=[],
        metavar="PREFIX",
        help="fetch dataset.json shard URLs that start with PREFIX (scheme://host/path/); repeatable",
    )


def command_trust(args: argparse.Namespace, folders: Iterable[str | os.PathLike]) -> Trust:
    """The Trust of one command line: --allow-pipe covers the folders it names."""
    return Trust.for_command(folders, args.allow_pipe, args.allow_remote)


def refusal(folder: str | os.PathLike, index: int, location: str, trust: Trust) -> str | None:
    """The one-line reason shard `index` of `folder` may not be opened (None: it may)."""
    kind = location_kind(location)
    where = f"{Path(folder) / 'dataset.json'}: shard {index}"
    if kind == "pipe" and not trust.allows_pipe(folder):
        return (
            f"{where} is the shell command {location!r}, which a dataset folder cannot run on its own; "
            f"if you trust this folder, allow its commands with {trust.pipe_opt_in(folder)}"
        )
    if kind == "url" and not trust.allows_url(location):
        return (
            f"{where} is the URL {location!r}, outside the remote prefixes you allowed; "
            f"if you trust that host, allow it with {trust.url_opt_in(location)}"
        )
    return None


def resolve(folder: str | os.PathLike, location: str) -> str:
    """A location as the readers open it: a relative path joins the dataset folder; the rest is kept."""
    if location_kind(location) != "path" or os.path.isabs(location):
        return location
    return str(Path(folder) / location)


def check_location(folder: str | os.PathLike, index: int, location: str, trust: Trust | None = None) -> Allowed:
    """One shard location (shard `index` of `folder`), resolved and checked; UserError (exit 3) when refused."""
    reason = refusal(folder, index, location, NOTHING if trust is None else trust)
    if reason:
        raise UserError(reason, ExitCode.DATA)
    return Allowed(resolve(folder, location))


def shard_locations(folder: str | os.PathLike, locations: list[str], trust: Trust | None = None) -> list[Allowed]:
    """Every shard location of the dataset `folder`, resolved and checked before any is opened;
    UserError (exit 3) naming the first refused one and how many more there are."""
    trust = NOTHING if trust is None else trust
    refused = [r for r in (refusal(folder, i, loc, trust) for i, loc in enumerate(locations)) if r]
    if refused:
        more = len(refused) - 1
        more = f" ({more} more shard{'s' if more > 1 else ''} of it refused too)" if more else ""
        raise UserError(refused[0] + more, ExitCode.DATA)
    return [Allowed(resolve(folder, loc)) for loc in locations]


def refusals(folder: str | os.PathLike, locations: list[str], trust: Trust | None = None) -> dict[int, str]:
    """{shard index: reason} of every refused location (`verify` reports them all)."""
    trust = NOTHING if trust is None else trust
    found = {i: refusal(folder, i, loc, trust) for i, loc in enumerate(locations)}
    return {i: reason for i, reason in found.items() if reason}


def require_allowed(location: str) -> None:
    """For the code that fetches or runs a location: it must have come through `shard_locations`."""
    if location_kind(location) in ("url", "pipe") and not isinstance(location, Allowed):
        raise RuntimeError(
            f"{location!r}: a shard location that did not pass data_tools.trust.shard_locations "
            f"(a reader skipped the gate)"
        )
