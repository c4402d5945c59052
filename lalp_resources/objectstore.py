"""Object stores as sources, inbox, exports and DuckLake data: `s3://bucket/prefix` (and any other
URL fsspec reads: `gs://`, `az://`, ... once its package is installed).

Where the store is and who we are come from the standard AWS configuration: the variables in
`lalp_resources.settings.OBJECT_STORE_VARIABLES` (`AWS_ENDPOINT_URL` for an S3-compatible store on
premises, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`), read
when an object is opened; for s3fs, what they leave unset is botocore's own chain (`~/.aws/`,
instance roles), for DuckLake's data (DuckDB's httpfs) the variables alone. None of them is a
`Settings` field, so no credential reaches the resource config that the UI shows.

An object is named by its URL. Its version is its ETag (for S3; GCS's and Azure's etags too): the
ingest ledger and the inbox sensor key an object by (size, ETag) where they key a file by (size,
mtime). An object is whole or absent (S3 shows a multipart upload only once it is completed), so
nothing here can read one half-written; a copy is downloaded once per read into a temporary
folder, read by the ordinary readers, and removed.

No Dagster here; the adapters, the pipeline, the assets and the warehouse call these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
S3_SCHEMES = ("s3", "s3a")


def is_remote(spec) -> bool:
    """Whether a source, inbox or export spec is an object-store URL (`file://` is a local path)."""
    if not isinstance(spec, str):
        return False
    m = _URL.match(spec.strip())
    return bool(m) and m.group("scheme").lower() != "file"


def join(base: str, *parts: str) -> str:
    """`base` (a local folder or a URL prefix) joined with `parts`."""
    if not is_remote(base):
        return str(Path(base, *parts))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


# ----------------------------------------------------------------------------- the file system


def s3_options(env: dict[str, str]) -> dict:
    """s3fs options from the object-store variables (what is unset is left to botocore)."""
    opts: dict = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        opts["key"], opts["secret"] = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            opts["token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def filesystem(url: str):
    """(fsspec file system, path inside it) for a URL. Listings are never cached: the inbox sensor
    lists the same prefix every tick and must see what changed."""
    import fsspec

    from lalp_resources.settings import object_store_env

    scheme = _URL.match(url).group("scheme").lower()
    opts = s3_options(object_store_env()) if scheme in S3_SCHEMES else {}
    try:
        fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False, **opts)
    except ImportError as e:  # e.g. gs:// without gcsfs
        raise RuntimeError(f"reading {scheme}:// needs its fsspec package ({e})") from e
    return fs, path


def _url(fs, path: str) -> str:
    return fs.unstrip_protocol(path)


@dataclass(frozen=True)
class ObjectInfo:
    url: str
    size: int
    etag: str            # the version the store gives (ETag), or the modification time when it has none
    mtime_s: float | None

    @property
    def stamp(self) -> int:
        """The version as a signed 64-bit integer, for the inbox sensor's cursor (only equality matters)."""
        return int.from_bytes(hashlib.sha256(self.etag.encode()).digest()[:8], "big", signed=True)


def _mtime(d: dict) -> float | None:
    for k in ("LastModified", "last_modified", "mtime", "updated", "timeCreated"):
        v = d.get(k)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            try:
                return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _info(fs, d: dict) -> ObjectInfo:
    etag = d.get("ETag") or d.get("etag") or d.get("md5Hash") or d.get("VersionId") or ""
    mtime = _mtime(d)
    if not etag:
        etag = f"mtime:{mtime}"
    return ObjectInfo(_url(fs, d["name"]), int(d.get("size") or 0), str(etag).strip('"'), mtime)


def info(url: str) -> ObjectInfo:
    """Size and version of one object. Raises FileNotFoundError when absent, OSError otherwise."""
    fs, path = filesystem(url)
    d = fs.info(path)
    if d.get("type") == "directory":
        raise IsADirectoryError(f"{url} is a prefix, not an object")
    return _info(fs, d)


def stat(url: str) -> tuple[int, None, str] | None:
    """(size, None, ETag) of an object, as the ledger keys it (a file's middle field is its mtime);
    None when it cannot be read."""
    try:
        i = info(url)
    except (OSError, ValueError):
        return None
    return i.size, None, i.etag


def list_folder(url: str, suffixes: tuple[str, ...] = ()) -> list[ObjectInfo]:
    """The objects directly under a prefix (not in deeper "folders"), sorted by URL; only those
    whose names end with one of `suffixes` when given. A prefix holding nothing is empty."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path.rstrip("/"), detail=True)
    except FileNotFoundError:
        return []
    out = [_info(fs, d) for d in entries if d.get("type") == "file"
           and (not suffixes or d["name"].lower().endswith(suffixes))]
    return sorted(out, key=lambda i: i.url)


class RemoteTree:
    """`lalp_resources.adapters.hf.Tree` over an object-store prefix."""

    def __init__(self, url: str):
        self.fs, _ = filesystem(url)

    def join(self, folder: str, name: str) -> str:
        return join(folder, name)

    def _ls(self, folder: str) -> list[dict]:
        try:
            return self.fs.ls(filesystem(folder)[1].rstrip("/"), detail=True)
        except FileNotFoundError:
            return []

    def is_dir(self, path: str) -> bool:
        return self.fs.isdir(filesystem(path)[1])

    def files(self, folder: str) -> list[str]:
        return [d["name"].rstrip("/").rsplit("/", 1)[-1] for d in self._ls(folder) if d.get("type") == "file"]

    def dirs(self, folder: str) -> list[str]:
        return [d["name"].rstrip("/").rsplit("/", 1)[-1] for d in self._ls(folder) if d.get("type") == "directory"]

    def read_text(self, path: str) -> str:
        return self.fs.cat_file(filesystem(path)[1]).decode("utf-8")


def expand(url: str, layout: Callable[[RemoteTree, str], list[str]]) -> list[str] | None:
    """A source URL -> the objects to read: an object as given; a prefix through `layout` (the
    Hugging Face layouts of `lalp_resources.adapters.hf`, else its own files). None when nothing
    is there (neither an object nor a prefix holding objects)."""
    fs, path = filesystem(url)
    try:
        d = fs.info(path)
    except FileNotFoundError:
        return None
    if d.get("type") == "file":
        return [url]
    return layout(RemoteTree(url), url.rstrip("/"))


# ----------------------------------------------------------------------------- reading


@contextlib.contextmanager
def local_copy(url: str, attempts: int = 3) -> Iterator[tuple[Path, ObjectInfo]]:
    """Download one object into a temporary folder (under its own name, so detection by extension
    works) and yield (path, its version); removed afterwards. The version is read before and after
    the download: when the object was replaced meanwhile, it is downloaded again, so the version
    always belongs to the bytes. Raises OSError when it cannot be read."""
    fs, path = filesystem(url)
    tmp = Path(tempfile.mkdtemp(prefix="lalp-object-"))
    try:
        local = tmp / (path.rstrip("/").rsplit("/", 1)[-1] or "object")
        for _ in range(attempts):
            before = info(url)
            fs.get_file(path, str(local))
            after = info(url)
            if after == before:
                break
        else:
            raise OSError(f"{url} kept changing while it was downloaded ({attempts} attempts)")
        yield local, after
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256(url: str) -> str:
    """sha256 of an object's bytes, streamed. Raises OSError when it cannot be read."""
    fs, path = filesystem(url)
    h = hashlib.sha256()
    with fs.open(path, "rb", block_size=1 << 22, cache_type="none") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def output_folder(target: str) -> Iterator[Path]:
    """A local folder to write outputs into: `target` itself when it is local; for a URL a
    temporary folder, uploaded under the prefix when the block succeeds (each object is written
    whole: a reader never sees one half-uploaded)."""
    if not is_remote(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        yield Path(target)
        return
    tmp = Path(tempfile.mkdtemp(prefix="lalp-exports-"))
    try:
        yield tmp
        upload_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_folder(local: Path, target: str) -> list[str]:
    """Every file under `local` to the same relative key under prefix `target`; returns the URLs."""
    fs, _ = filesystem(target)
    out = []
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        url = join(target, *f.relative_to(local).parts)
        fs.put_file(str(f), filesystem(url)[1])
        out.append(url)
    return out


# ----------------------------------------------------------------------------- DuckDB


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def duckdb_s3_secret() -> str | None:
    """`CREATE SECRET` for DuckDB's httpfs from the AWS variables, so DuckLake can keep its Parquet
    files under `s3://`. None when none is set (DuckDB then reads public buckets anonymously).
    Only the variables: asking botocore's chain here could reach for an instance-metadata service
    on a machine that has none, every time a catalog is attached."""
    from lalp_resources.settings import object_store_env

    env = object_store_env()
    key, secret, token = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_SESSION_TOKEN")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not (key and secret) and not endpoint:
        return None
    parts = ["TYPE s3"]
    if key and secret:
        parts += [f"KEY_ID {_sql_str(key)}", f"SECRET {_sql_str(secret)}"]
        if token:
            parts.append(f"SESSION_TOKEN {_sql_str(token)}")
    if region:
        parts.append(f"REGION {_sql_str(region)}")
    if endpoint:
        m = re.match(r"^(?:(https?)://)?([^/]+)", endpoint)
        scheme, host = (m.group(1) or "https"), m.group(2)
        # an on-premises store is addressed by path (bucket in the path, not the host name)
        parts += [f"ENDPOINT {_sql_str(host)}", "URL_STYLE 'path'", f"USE_SSL {'true' if scheme == 'https' else 'false'}"]
    return f"CREATE OR REPLACE SECRET lalp_s3 ({', '.join(parts)})"
