"""Loaders that turn MovieLens in its common shapes into a validated ``Dataset``.

Every failure becomes a one-line ``DataError`` naming the file and the problem, because these
readers sit behind the CLI and a stack trace tells a user nothing about which file to fix.
Ids, ratings and timestamps must be finite numbers; the rules on their values (whole stars 1-5,
timestamps >= 0, duplicate pairs keep the latest rating) are ``simulator.data.validate``'s, and
the ratings keep their line (or row) numbers as the index so its messages point at the row.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from simulator.data import DataError, Dataset, Item, User, validate

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/"
FETCHABLE = ("ml-100k", "ml-1m", "ml-latest-small")
# "unknown" (ml-100k) and "(no genres listed)" (ml-latest) mean "no genre", not a genre of its own.
NO_GENRE = {"unknown", "(no genres listed)"}
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]
# ml-1m stores occupations as codes (its README); names keep personas readable.
ML1M_OCCUPATIONS = ["other", "academic/educator", "artist", "clerical/admin",
                    "college/grad student", "customer service", "doctor/health care",
                    "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
                    "programmer", "retired", "sales/marketing", "scientist", "self-employed",
                    "technician/engineer", "tradesman/craftsman", "unemployed", "writer"]
_TITLE_YEAR = re.compile(r"^(.*\S)\s*\((\d{4})\)\s*$")


def cache_root() -> Path:
    """One cache folder for every module, movable with ``$ALIGNUSER_CACHE``."""
    root = Path(os.environ.get("ALIGNUSER_CACHE") or Path.home() / ".cache" / "alignuser")
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def datasets_cache() -> Path:
    """Where ``fetch`` puts archives by default, so ``load_dataset`` finds them without flags."""
    path = cache_root() / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def bundled_ml100k_dir() -> Path:
    """ml-100k ships inside the recbole wheel, which gives an offline default dataset."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the bundled ml-100k needs the recbole wheel: "
                        "pip install --no-deps recbole==1.2.1")
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "dataset_example" / "ml-100k"
        if (folder / "ml-100k.inter").is_file():
            return folder
    raise DataError("recbole is installed but its dataset_example/ml-100k folder is missing")


# ---------------------------------------------------------------- RecBole atomic files

def _read_atomic_file(path: Path, required: list[str]) -> pd.DataFrame:
    """Parse by hand (not pandas) so a bad row is reported with its line number."""
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path.name}: no header line")
    columns = [h.split(":", 1)[0].strip() for h in lines[0].split("\t")]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path.name}: bad header, required field(s) {', '.join(missing)} missing "
                        f"(header is {lines[0].strip()!r})")
    rows, line_nos = [], []
    for no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise DataError(f"{path.name} line {no}: expected {len(columns)} tab-separated fields, "
                            f"got {len(fields)}")
        rows.append(fields)
        line_nos.append(no)
    frame = pd.DataFrame(rows, columns=columns, dtype=str)
    frame.index = pd.Index(line_nos, name="line")
    return frame


def _numeric(frame: pd.DataFrame, column: str, fname: str, integer: bool) -> pd.Series:
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    bad = ~np.isfinite(values)  # NaN (not a number) and "inf"
    if integer:
        bad |= values.notna() & (values != values.round())
    if bad.any():
        line = bad.idxmax()
        raise DataError(f"{fname} line {line}: {column} {frame.at[line, column]!r} is not "
                        f"{'an integer' if integer else 'a number'}")
    return values.astype("int64" if integer else "float64")


def _opt_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def _genres(tokens: list[str]) -> tuple[str, ...]:
    return tuple(g for g in tokens if g and g not in NO_GENRE)


def read_atomic(directory: str | Path, name: str | None = None) -> Dataset:
    """Read ``<name>.inter``, ``<name>.item`` and optional ``<name>.user`` from one folder."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DataError(f"dataset folder not found: {directory}")
    name = name or directory.name
    inter = _read_atomic_file(directory / f"{name}.inter",
                              ["user_id", "item_id", "rating", "timestamp"])
    fname = f"{name}.inter"
    ratings = pd.DataFrame({
        "user": _numeric(inter, "user_id", fname, True),
        "item": _numeric(inter, "item_id", fname, True),
        "rating": _numeric(inter, "rating", fname, False),
        "timestamp": _numeric(inter, "timestamp", fname, False).round().astype("int64"),
    })  # indexed by line number, for validate's messages

    item_df = _read_atomic_file(directory / f"{name}.item", ["item_id"])
    item_ids = _numeric(item_df, "item_id", f"{name}.item", True)
    items: dict[int, Item] = {}
    for (line, iid), row in zip(item_ids.items(), item_df.to_dict("records"), strict=True):
        iid = int(iid)
        if iid in items:
            raise DataError(f"{name}.item line {line}: duplicate item_id {iid}")
        title = row.get("movie_title", "").strip() or f"Item {iid}"
        items[iid] = Item(id=iid, title=title, year=_opt_int(row.get("release_year", "")),
                          genres=_genres(row.get("class", "").split(" ")))

    users: dict[int, User] = {}
    if (directory / f"{name}.user").is_file():
        user_df = _read_atomic_file(directory / f"{name}.user", ["user_id"])
        user_ids = _numeric(user_df, "user_id", f"{name}.user", True)
        for uid, row in zip(user_ids.tolist(), user_df.to_dict("records"), strict=True):
            users[uid] = User(id=uid, age=_opt_int(row.get("age", "")),
                              gender=row.get("gender", "").strip() or None,
                              occupation=row.get("occupation", "").strip() or None)
    return validate(name, users, items, ratings, source=fname)


# ---------------------------------------------------------------- GroupLens archives

def _split_title(title: str) -> tuple[str, int | None]:
    match = _TITLE_YEAR.match(title.strip())
    return (match.group(1), int(match.group(2))) if match else (title.strip(), None)


def _member(zf: zipfile.ZipFile, basename: str) -> str | None:
    hits = sorted((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == basename), key=len)
    return hits[0] if hits else None


def _text(zf: zipfile.ZipFile, member: str) -> str:
    return zf.read(member).decode("latin-1")


def _frame(zf: zipfile.ZipFile, member: str, sep: str, names: list[str] | None,
           header: bool = False, as_text: bool = True) -> pd.DataFrame:
    """Multi-character separators become tabs so pandas can use its fast C parser."""
    text = _text(zf, member)
    if len(sep) > 1:
        text = text.replace(sep, "\t")
        sep = "\t"
    try:
        return pd.read_csv(io.StringIO(text), sep=sep, header=0 if header else None, names=names,
                           dtype=str if as_text else None, keep_default_na=not as_text,
                           engine="c")
    except (pd.errors.ParserError, ValueError) as err:
        raise DataError(f"{member}: cannot parse ({str(err).splitlines()[0]})") from None


def _ratings(frame: pd.DataFrame, member: str, cols: list[str]) -> pd.DataFrame:
    """Numeric columns indexed by 1-based data row (header excluded), for the error messages."""
    frame = frame.reset_index(drop=True)
    frame.index = pd.Index(range(1, len(frame) + 1), name="row")
    out = {}
    for col, target in zip(cols, ["user", "item", "rating", "timestamp"], strict=True):
        values = frame[col]
        if not pd.api.types.is_numeric_dtype(values):  # only a bad row makes pandas keep text
            values = pd.to_numeric(values, errors="coerce")
        bad = ~np.isfinite(values.astype("float64"))
        if target in ("user", "item"):
            bad |= values.astype("float64") != values.astype("float64").round()
        if bad.any():
            row = bad.idxmax()
            kind = "a number" if target in ("rating", "timestamp") else "an integer id"
            raise DataError(f"{member} row {row}: {target} {str(frame.at[row, col])!r} "
                            f"is not {kind}")
        out[target] = values
    ratings = pd.DataFrame(out)
    ratings["timestamp"] = ratings["timestamp"].round().astype("int64")
    return ratings


def _read_ml100k(zf: zipfile.ZipFile, name: str) -> Dataset:
    data, uitem, uuser = (_member(zf, n) for n in ("u.data", "u.item", "u.user"))
    assert data and uitem
    cols = ["u", "i", "r", "t"]
    ratings = _ratings(_frame(zf, data, "\t", cols, as_text=False), data, cols)
    genre_names = ML100K_GENRES
    if (ugenre := _member(zf, "u.genre")) is not None:
        pairs = [ln.split("|") for ln in _text(zf, ugenre).splitlines() if "|" in ln]
        genre_names = [g for g, _ in sorted(pairs, key=lambda p: int(p[1]))]
    items: dict[int, Item] = {}
    for no, line in enumerate(_text(zf, uitem).splitlines(), start=1):
        if not line.strip():
            continue
        f = line.split("|")
        if len(f) < 5 + len(genre_names) or not f[0].isdigit():
            raise DataError(f"{uitem} line {no}: expected id|title|date|video date|url|"
                            f"{len(genre_names)} genre flags")
        title, year = _split_title(f[1])
        year = year or _opt_int(f[2][-4:])
        flags = f[5:5 + len(genre_names)]
        genres = [g for g, x in zip(genre_names, flags, strict=True) if x == "1"]
        items[int(f[0])] = Item(id=int(f[0]), title=title or f"Item {f[0]}", year=year,
                                genres=_genres(genres))
    users: dict[int, User] = {}
    if uuser is not None:
        for row in _frame(zf, uuser, "|", ["id", "age", "gender", "occ", "zip"]).itertuples():
            users[int(row.id)] = User(id=int(row.id), age=_opt_int(row.age),
                                      gender=row.gender or None, occupation=row.occ or None)
    return validate(name, users, items, ratings, source=data)


def _read_ml1m(zf: zipfile.ZipFile, name: str) -> Dataset:
    data, movies, users_m = (_member(zf, n) for n in ("ratings.dat", "movies.dat", "users.dat"))
    assert data and movies
    cols = ["u", "i", "r", "t"]
    ratings = _ratings(_frame(zf, data, "::", cols, as_text=False), data, cols)
    items: dict[int, Item] = {}
    for no, line in enumerate(_text(zf, movies).splitlines(), start=1):
        if not line.strip():
            continue
        head, _, genres = line.rpartition("::")
        iid, _, title = head.partition("::")
        if not iid.isdigit() or not title:
            raise DataError(f"{movies} line {no}: expected MovieID::Title (Year)::Genres")
        title, year = _split_title(title)
        items[int(iid)] = Item(id=int(iid), title=title, year=year,
                               genres=_genres(genres.strip().split("|")))
    users: dict[int, User] = {}
    if users_m is not None:
        # Age is a bracket code (1 = under 18, 18 = 18-24, ..., 56 = 56+): kept as the lower bound.
        for row in _frame(zf, users_m, "::", ["id", "gender", "age", "occ", "zip"]).itertuples():
            occ = _opt_int(row.occ)
            users[int(row.id)] = User(
                id=int(row.id), age=_opt_int(row.age), gender=row.gender or None,
                occupation=ML1M_OCCUPATIONS[occ] if occ is not None and occ < 21 else None)
    return validate(name, users, items, ratings, source=data)


def _read_latest(zf: zipfile.ZipFile, name: str) -> Dataset:
    data, movies = _member(zf, "ratings.csv"), _member(zf, "movies.csv")
    assert data and movies
    raw = _frame(zf, data, ",", None, header=True, as_text=False)
    cols = ["userId", "movieId", "rating", "timestamp"]
    if missing := [c for c in cols if c not in raw.columns]:
        raise DataError(f"{data}: bad header, missing {', '.join(missing)}")
    ratings = _ratings(raw, data, cols)
    # Half stars (0.5-5.0) round up to whole stars 1-5 so every dataset shares one 1-5 scale;
    # anything off that scale (0, negative, 5.5, 3.7) is rejected rather than clipped into it.
    stars = ratings["rating"].astype("float64")
    off_scale = ~(stars * 2).isin(range(1, 11))
    if off_scale.any():
        row = off_scale.idxmax()
        raise DataError(f"{data} row {row}: rating {stars[row]} is off the 0.5-5.0 half-star "
                        f"scale; {int(off_scale.sum())} such row(s)")
    ratings["rating"] = np.ceil(stars)
    mov = _frame(zf, movies, ",", None, header=True)
    if missing := [c for c in ("movieId", "title", "genres") if c not in mov.columns]:
        raise DataError(f"{movies}: bad header, missing {', '.join(missing)}")
    items: dict[int, Item] = {}
    for row in mov.itertuples():
        if not str(row.movieId).isdigit():
            raise DataError(f"{movies} row {row.Index + 1}: movieId {row.movieId!r} "
                            "is not a number")
        title, year = _split_title(row.title)
        items[int(row.movieId)] = Item(id=int(row.movieId), title=title, year=year,
                                       genres=_genres(row.genres.split("|")))
    return validate(name, {}, items, ratings, source=data)


def read_movielens_zip(path: str | Path) -> Dataset:
    """Read an official GroupLens zip (ml-100k, ml-1m or ml-latest-small), told apart by members."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"archive not found: {path}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a zip archive")
    name = path.name.removesuffix(".zip")
    with zipfile.ZipFile(path) as zf:
        if _member(zf, "u.data") and _member(zf, "u.item"):
            return _read_ml100k(zf, name)
        if _member(zf, "ratings.dat") and _member(zf, "movies.dat"):
            return _read_ml1m(zf, name)
        if _member(zf, "ratings.csv") and _member(zf, "movies.csv"):
            return _read_latest(zf, name)
    raise DataError(f"{path.name}: not a MovieLens archive (expected u.data+u.item, "
                    "ratings.dat+movies.dat, or ratings.csv+movies.csv)")


# ---------------------------------------------------------------- download and dispatch

def fetch(name: str, cache_dir: Path, base_url: str = GROUPLENS_URL, *,
          timeout: float = 30.0, force: bool = False) -> Path:
    """Download ``<name>.zip`` once; a temp file renamed into place means no half archives."""
    hint = "download it yourself and pass the local archive path instead"
    if name not in FETCHABLE:
        raise DataError(f"cannot download {name!r}: known archives are {', '.join(FETCHABLE)}; "
                        f"for anything else pass a local archive path instead")
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / f"{name}.zip"
    if dest.is_file() and not force and zipfile.is_zipfile(dest):
        return dest
    url = base_url.rstrip("/") + f"/{name}.zip"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}.zip",
                      disable=None) as bar:
                while chunk := resp.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
        if not zipfile.is_zipfile(tmp):
            raise DataError(f"cannot download {url}: the server did not return a zip archive; "
                            f"{hint}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(f"cannot download {url} ({reason}); {hint}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def load_dataset(spec: str = "ml-100k", cache_dir: Path | None = None) -> Dataset:
    """Resolve a dataset name or path; never downloads, so loading stays offline and quick."""
    if spec == "ml-100k":
        return read_atomic(bundled_ml100k_dir(), "ml-100k")
    path = Path(spec).expanduser()
    if path.is_dir():
        return read_atomic(path)
    if path.is_file():
        if path.suffix.lower() == ".zip":
            return read_movielens_zip(path)
        raise DataError(f"{path}: expected a folder of RecBole atomic files or a MovieLens .zip")
    if spec in FETCHABLE:
        archive = Path(cache_dir or datasets_cache()) / f"{spec}.zip"
        if archive.is_file():
            return read_movielens_zip(archive)
        raise DataError(f"{spec} is not downloaded yet: run `alignuser data fetch {spec}` "
                        f"(or pass the path of a local {spec}.zip)")
    raise DataError(f"unknown dataset {spec!r}: use ml-100k, ml-1m, ml-latest-small, a folder of "
                    "RecBole atomic files, or a MovieLens .zip")
