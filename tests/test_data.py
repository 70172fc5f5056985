"""Readers, splits and summaries: real ml-100k counts plus small hand-built bad and good inputs."""

from __future__ import annotations

import functools
import http.server
import io
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from rich.console import Console

from simulator.data import DataError, Dataset
from simulator.info import dataset_info, format_info
from simulator.readers import (
    bundled_ml100k_dir,
    cache_root,
    fetch,
    load_dataset,
    read_atomic,
    read_movielens_zip,
)
from simulator.split import Split, SplitConfig, global_cutoffs, make_split

INTER_HEAD = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM_HEAD = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"
USER_HEAD = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"
GOOD_INTER = ["1\t10\t4\t100", "1\t11\t5\t200", "2\t10\t3\t150"]
GOOD_ITEM = ["10\tAlpha\t1995\tAction Comedy", "11\tBeta\tunknown\tunknown"]
GOOD_USER = ["1\t24\tM\ttechnician\t85711", "2\t53\tF\tother\t94043"]


def write_atomic(folder: Path, inter: list[str] | None = None, item: list[str] | None = None,
                 user: list[str] | None = None, name: str = "toy",
                 inter_head: str = INTER_HEAD) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if inter is not None:
        (folder / f"{name}.inter").write_text("\n".join([inter_head, *inter]) + "\n")
    if item is not None:
        (folder / f"{name}.item").write_text("\n".join([ITEM_HEAD, *item]) + "\n")
    if user is not None:
        (folder / f"{name}.user").write_text("\n".join([USER_HEAD, *user]) + "\n")
    return folder


# ---------------------------------------------------------------- bundled ml-100k

def test_ml100k_counts(ml100k: Dataset) -> None:
    assert ml100k.name == "ml-100k"
    assert (len(ml100k.users), len(ml100k.items), len(ml100k.ratings)) == (943, 1682, 100_000)
    assert ml100k.ratings["user"].nunique() == 943
    assert set(ml100k.ratings["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert ml100k.ratings["timestamp"].dtype == np.int64


def test_ml100k_fields(ml100k: Dataset) -> None:
    assert sorted(i.id for i in ml100k.items.values() if i.year is None) == [267, 1412]
    toy = ml100k.items[1]
    assert (toy.title, toy.year, toy.genres) == ("Toy Story", 1995,
                                                 ("Animation", "Children's", "Comedy"))
    assert "unknown" not in ml100k.genres and len(ml100k.genres) == 18
    assert ml100k.users[1].model_dump() == {"id": 1, "age": 24, "gender": "M",
                                            "occupation": "technician"}
    assert bundled_ml100k_dir().name == "ml-100k"


# ---------------------------------------------------------------- atomic files, good and bad

def test_read_atomic_good(tmp_path: Path) -> None:
    ds = read_atomic(write_atomic(tmp_path / "toy", GOOD_INTER, GOOD_ITEM, GOOD_USER))
    assert ds.name == "toy" and len(ds.ratings) == 3
    assert ds.items[11].year is None and ds.items[11].genres == ()
    assert ds.items[10].genres == ("Action", "Comedy")
    assert ds.users[2].gender == "F"
    # The .user file is optional: users are then derived from the log.
    bare = read_atomic(write_atomic(tmp_path / "bare", GOOD_INTER, GOOD_ITEM, name="bare"))
    assert sorted(bare.users) == [1, 2] and bare.users[1].age is None
    assert load_dataset(str(tmp_path / "toy")).ratings.equals(ds.ratings)


@pytest.mark.parametrize(("inter", "item", "inter_head", "expect"), [
    (GOOD_INTER, None, INTER_HEAD, "toy.item"),
    (None, GOOD_ITEM, INTER_HEAD, "toy.inter"),
    (GOOD_INTER, GOOD_ITEM, "user_id:token\titem_id:token\ttimestamp:float", "rating"),
    (["1\t10\t4"], GOOD_ITEM, INTER_HEAD, "line 2"),
    (["1\t10\t4\t100", "1\tabc\t5\t200"], GOOD_ITEM, INTER_HEAD, "line 3"),
    (["1\t10\t7\t100"], GOOD_ITEM, INTER_HEAD, "out of range"),
    (["1\t10\t4\t100", "1\t11\t0\t200"], GOOD_ITEM, INTER_HEAD,
     r"line 3: rating 0\.0 out of range"),
    (["1\t10\t-2\t100"], GOOD_ITEM, INTER_HEAD, "line 2: rating -2.0 out of range"),
    (["1\t10\t3.5\t100"], GOOD_ITEM, INTER_HEAD, r"rating 3\.5 out of range \(whole stars"),
    (["1\t10\t4\t100", "1\t11\t5\t-5"], GOOD_ITEM, INTER_HEAD,
     r"toy\.inter line 3: timestamp -5 is negative \(timestamps are unix seconds"),
    (["1\t10\t4\tyesterday"], GOOD_ITEM, INTER_HEAD,
     "toy.inter line 2: timestamp 'yesterday' is not a number"),
    (["1\t10\t4\tinf"], GOOD_ITEM, INTER_HEAD, "line 2: timestamp 'inf' is not a number"),
    (["1\t99\t4\t100"], GOOD_ITEM, INTER_HEAD, "unknown item"),
    ([], GOOD_ITEM, INTER_HEAD, "empty"),
])
def test_read_atomic_errors(tmp_path: Path, inter: list[str] | None, item: list[str] | None,
                            inter_head: str, expect: str) -> None:
    folder = write_atomic(tmp_path / "toy", inter, item, inter_head=inter_head)
    with pytest.raises(DataError, match=expect) as err:
        read_atomic(folder)
    assert "\n" not in str(err.value)


def test_duplicate_pairs_keep_the_latest_rating(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The later rating by timestamp wins wherever it sits in the file; one line reports it."""
    inter = ["1\t10\t2\t300", "1\t10\t4\t100", *GOOD_INTER[1:], "1\t10\t5\t200"]
    with caplog.at_level("WARNING", logger="simulator.data"):
        ds = read_atomic(write_atomic(tmp_path / "toy", inter, GOOD_ITEM))
    by_pair = {(r.user, r.item): (r.rating, r.timestamp) for r in ds.ratings.itertuples()}
    assert by_pair == {(1, 10): (2.0, 300), (1, 11): (5.0, 200), (2, 10): (3.0, 150)}
    assert [r.getMessage() for r in caplog.records] == [
        "toy.inter: dropped 2 duplicate (user, item) row(s), keeping each pair's latest rating "
        "by timestamp"]
    caplog.clear()
    read_atomic(write_atomic(tmp_path / "clean", GOOD_INTER, GOOD_ITEM, name="clean"))
    assert caplog.records == []


def test_bad_header_names_file_and_field(tmp_path: Path) -> None:
    folder = write_atomic(tmp_path / "toy", GOOD_INTER, GOOD_ITEM,
                          inter_head="user_id:token\titem_id:token\ttimestamp:float")
    with pytest.raises(DataError, match=r"toy\.inter: bad header.*rating"):
        read_atomic(folder)


def test_missing_folder_and_specs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found"):
        read_atomic(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("no-such-dataset")
    with pytest.raises(DataError, match="alignuser data fetch ml-1m"):
        load_dataset("ml-1m", cache_dir=tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="expected a folder"):
        load_dataset(str(tmp_path / "notes.txt"))


def test_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNUSER_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and (tmp_path / "c").is_dir()


# ---------------------------------------------------------------- GroupLens archives

def _zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in members.items():
            zf.writestr(member, text.encode("latin-1"))
    return path


def _flags(*on: int) -> str:
    return "|".join("1" if k in on else "0" for k in range(19))


def make_ml100k_zip(path: Path) -> Path:
    genre = "\n".join(f"{g}|{k}" for k, g in enumerate(
        ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
         "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
         "Romance", "Sci-Fi", "Thriller", "War", "Western"]))
    return _zip(path, {
        "ml-100k/u.data": "1\t1\t5\t874965758\n1\t2\t3\t876893171\n2\t1\t4\t888550871\n",
        "ml-100k/u.item": (f"1|Toy Story (1995)|01-Jan-1995||http://x|{_flags(3, 4, 5)}\n"
                           f"2|Café Society (1995)|01-Jan-1995||http://y|{_flags(8)}\n"
                           f"3|unknown||||{_flags(0)}\n"),
        "ml-100k/u.user": "1|24|M|technician|85711\n2|53|F|other|94043\n",
        "ml-100k/u.genre": genre + "\n\n",
        "ml-100k/ua.base": "ignored",
    })


def make_ml1m_zip(path: Path) -> Path:
    return _zip(path, {
        "ml-1m/ratings.dat": "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n",
        "ml-1m/movies.dat": ("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                             "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                             "5::Señorita, The (a.k.a. Test) (2000)::Comedy\n"),
        "ml-1m/users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
    })


def make_latest_zip(path: Path) -> Path:
    return _zip(path, {
        "ml-latest-small/ratings.csv": ("userId,movieId,rating,timestamp\n"
                                        "1,1,4.0,964982703\n1,3,0.5,964981247\n"
                                        "2,1,3.5,964982224\n2,11,2.5,1445714835\n"),
        "ml-latest-small/movies.csv": ('movieId,title,genres\n'
                                       '1,Toy Story (1995),Adventure|Animation|Children\n'
                                       '3,Grumpier Old Men (1995),Comedy|Romance\n'
                                       '11,"American President, The (1995)",Comedy|Drama\n'
                                       '12,No Year Film,(no genres listed)\n'),
        "ml-latest-small/links.csv": "movieId,imdbId,tmdbId\n",
    })


def test_zip_ml100k(tmp_path: Path) -> None:
    ds = read_movielens_zip(make_ml100k_zip(tmp_path / "ml-100k.zip"))
    assert ds.name == "ml-100k" and len(ds.ratings) == 3 and len(ds.users) == 2
    assert ds.items[1].model_dump() == {"id": 1, "title": "Toy Story", "year": 1995,
                                        "genres": ("Animation", "Children's", "Comedy")}
    assert ds.items[2].title == "Café Society" and ds.items[2].genres == ("Drama",)
    assert ds.items[3].year is None and ds.items[3].genres == ()
    assert ds.users[2].occupation == "other"


def test_zip_ml1m(tmp_path: Path) -> None:
    ds = read_movielens_zip(make_ml1m_zip(tmp_path / "ml-1m.zip"))
    assert len(ds.ratings) == 3 and ds.items[1193].year == 1975
    assert ds.items[661].genres == ("Animation", "Children's", "Musical")
    assert ds.items[5].title == "Señorita, The (a.k.a. Test)" and ds.items[5].year == 2000
    assert ds.users[1].model_dump() == {"id": 1, "age": 1, "gender": "F",
                                        "occupation": "K-12 student"}
    assert ds.users[2].occupation == "self-employed"


def test_zip_latest_small_rounds_half_stars_up(tmp_path: Path) -> None:
    ds = read_movielens_zip(make_latest_zip(tmp_path / "ml-latest-small.zip"))
    by_pair = {(r.user, r.item): r.rating for r in ds.ratings.itertuples()}
    assert by_pair == {(1, 1): 4.0, (1, 3): 1.0, (2, 1): 4.0, (2, 11): 3.0}
    assert ds.items[11].title == "American President, The" and ds.items[11].year == 1995
    assert ds.items[12].year is None and ds.items[12].genres == ()
    assert sorted(ds.users) == [1, 2] and ds.users[1].age is None


def test_zip_errors_and_dispatch(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="archive not found"):
        read_movielens_zip(tmp_path / "missing.zip")
    (tmp_path / "fake.zip").write_text("not a zip")
    with pytest.raises(DataError, match="not a zip"):
        read_movielens_zip(tmp_path / "fake.zip")
    with pytest.raises(DataError, match="not a MovieLens archive"):
        read_movielens_zip(_zip(tmp_path / "other.zip", {"readme.txt": "hi"}))
    bad = _zip(tmp_path / "bad.zip", {"u.data": "1\tx\t5\t1\n", "u.item": f"1|A|||x|{_flags()}\n"})
    with pytest.raises(DataError, match="u.data row 1"):
        read_movielens_zip(bad)
    assert len(load_dataset(str(make_ml1m_zip(tmp_path / "x.zip"))).ratings) == 3
    cache = tmp_path / "cache"
    cache.mkdir()
    make_ml1m_zip(cache / "ml-1m.zip")
    assert load_dataset("ml-1m", cache_dir=cache).name == "ml-1m"


@pytest.mark.parametrize(("rating", "expect"), [
    ("0.0", r"row 2: rating 0\.0 is off the 0\.5-5\.0 half-star scale"),
    ("-1", r"row 2: rating -1\.0 is off"), ("5.5", r"row 2: rating 5\.5 is off"),
    ("3.7", r"row 2: rating 3\.7 is off")])
def test_zip_latest_rejects_ratings_off_its_scale(tmp_path: Path, rating: str,
                                                   expect: str) -> None:
    """Before, a 0 or negative rating was clipped to one star without a word."""
    bad = _zip(tmp_path / "ml-latest-small.zip", {
        "ratings.csv": f"userId,movieId,rating,timestamp\n1,1,4.0,9\n1,3,{rating},10\n",
        "movies.csv": "movieId,title,genres\n1,A (1995),Drama\n3,B (1996),Drama\n"})
    with pytest.raises(DataError, match=f"ratings.csv {expect}") as err:
        read_movielens_zip(bad)
    assert "\n" not in str(err.value)


def test_zip_timestamps_and_duplicates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    item = f"1|A (1995)|||x|{_flags()}\n2|B (1996)|||x|{_flags()}\n"
    negative = _zip(tmp_path / "neg.zip", {"u.data": "1\t1\t5\t10\n1\t2\t3\t-1\n",
                                           "u.item": item})
    with pytest.raises(DataError, match=r"^u\.data row 2: timestamp -1 is negative"):
        read_movielens_zip(negative)
    text = _zip(tmp_path / "text.zip", {"ratings.dat": "1::1193::5::noon\n",
                                        "movies.dat": "1193::A (1975)::Drama\n"})
    with pytest.raises(DataError, match=r"^ratings\.dat row 1: timestamp 'noon' is not a num"):
        read_movielens_zip(text)
    fractional_id = _zip(tmp_path / "id.zip", {"u.data": "1\t1.5\t5\t10\n", "u.item": item})
    with pytest.raises(DataError, match=r"u\.data row 1: item '1\.5' is not an integer id"):
        read_movielens_zip(fractional_id)
    dup = _zip(tmp_path / "dup.zip", {"ml-1m/ratings.dat": "1::1::5::20\n1::1::2::10\n",
                                      "ml-1m/movies.dat": "1::A (1975)::Drama\n"})
    with caplog.at_level("WARNING", logger="simulator.data"):
        ds = read_movielens_zip(dup)
    assert ds.ratings[["rating", "timestamp"]].values.tolist() == [[5.0, 20]]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["ml-1m/ratings.dat"]


# ---------------------------------------------------------------- fetch

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def archive_server(tmp_path: Path) -> Iterator[str]:
    served = tmp_path / "served"
    served.mkdir()
    make_latest_zip(served / "ml-latest-small.zip")
    (served / "ml-1m.zip").write_text("<html>not found page</html>")
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_fetch_from_local_server(tmp_path: Path, archive_server: str) -> None:
    cache = tmp_path / "cache"
    path = fetch("ml-latest-small", cache, base_url=archive_server, timeout=5)
    assert path == cache / "ml-latest-small.zip"
    assert path.read_bytes() == (tmp_path / "served" / "ml-latest-small.zip").read_bytes()
    assert [p.name for p in cache.iterdir()] == ["ml-latest-small.zip"]
    assert len(load_dataset("ml-latest-small", cache_dir=cache).ratings) == 4
    with pytest.raises(DataError, match="cannot download.*local archive path"):
        fetch("ml-100k", cache, base_url=archive_server, timeout=5)  # 404
    with pytest.raises(DataError, match="not return a zip"):
        fetch("ml-1m", cache, base_url=archive_server, timeout=5)
    assert [p.name for p in cache.iterdir()] == ["ml-latest-small.zip"]


def test_fetch_unreachable_and_unknown(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DataError, match="cannot download.*local archive path"):
        fetch("ml-1m", tmp_path, base_url=f"http://127.0.0.1:{port}/", timeout=5)
    with pytest.raises(DataError, match="cannot download 'ml-25m'.*local archive path"):
        fetch("ml-25m", tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- splits

def _per_user(df: pd.DataFrame, how: str) -> pd.Series:
    return df.groupby("user")["timestamp"].agg(how)


def test_user_chrono_invariants(ml100k: Dataset, split100k: Split) -> None:
    sp = split100k
    keys = [set(zip(p.user, p.item, strict=True)) for p in (sp.train, sp.valid, sp.test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert sum(sp.sizes().values()) == len(ml100k.ratings)
    union = pd.concat([sp.train, sp.valid, sp.test])
    assert union.sort_values(["user", "item"]).reset_index(drop=True).equals(
        ml100k.ratings.sort_values(["user", "item"]).reset_index(drop=True))
    for part in (sp.train, sp.valid, sp.test):
        assert part["user"].nunique() == 943
    assert (_per_user(sp.train, "max") <= _per_user(sp.valid, "min")).all()
    assert (_per_user(sp.valid, "max") <= _per_user(sp.test, "min")).all()
    assert sp.sizes() == {"train": 69_963, "valid": 10_037, "test": 20_000}
    prints = {sp.fingerprint(p) for p in ("train", "valid", "test")}
    assert len(prints) == 3
    shuffled = ml100k.ratings.sample(frac=1.0, random_state=0)
    again = make_split(shuffled)
    assert all(again.fingerprint(p) == sp.fingerprint(p) for p in ("train", "valid", "test"))
    with pytest.raises(ValueError, match="unknown split part"):
        sp.fingerprint("dev")


def test_user_chrono_small_histories(tiny_dataset: Dataset) -> None:
    rows = [(u, k, 3.0, 100 * k) for u, n in [(1, 1), (2, 2), (3, 3), (4, 5), (5, 10)]
            for k in range(n)]
    sp = make_split(pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]))
    counts = {p: sp.part(p).groupby("user").size().to_dict() for p in ("train", "valid", "test")}
    assert counts["train"] == {1: 1, 2: 2, 3: 1, 4: 3, 5: 7}
    assert counts["valid"] == {3: 1, 4: 1, 5: 1}
    assert counts["test"] == {3: 1, 4: 1, 5: 2}
    tiny = make_split(tiny_dataset.ratings)
    assert tiny.sizes() == {"train": 24, "valid": 6, "test": 6}
    assert set(tiny.test["timestamp"] % 1000) == {50}


def test_global_time_invariants(ml100k: Dataset) -> None:
    cfg = SplitConfig(kind="global_time")
    valid_time, test_time = global_cutoffs(ml100k.ratings, cfg)
    ts = np.sort(ml100k.ratings["timestamp"].to_numpy())
    assert valid_time == int(np.quantile(ts, 0.7, method="lower"))
    assert test_time == int(np.quantile(ts, 0.8, method="lower"))
    sp = make_split(ml100k.ratings, cfg)
    assert sum(sp.sizes().values()) == 100_000
    assert sp.train["timestamp"].max() < valid_time <= sp.valid["timestamp"].min()
    assert sp.valid["timestamp"].max() < test_time <= sp.test["timestamp"].min()
    assert abs(len(sp.test) / 100_000 - 0.2) < 0.01
    assert make_split(ml100k.ratings, cfg).fingerprint("test") == sp.fingerprint("test")
    fixed = make_split(ml100k.ratings, SplitConfig(kind="global_time", valid_time=880_000_000,
                                                   test_time=890_000_000))
    assert fixed.train["timestamp"].max() < 880_000_000 <= fixed.valid["timestamp"].min()
    assert fixed.test["timestamp"].min() >= 890_000_000
    with pytest.raises(ValidationError):
        SplitConfig(kind="global_time", valid_time=2, test_time=1)
    with pytest.raises(ValidationError):
        SplitConfig(valid_frac=0.5, test_frac=0.5)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        SplitConfig(kind="global_time", valid_time=-1)


# ---------------------------------------------------------------- info

def test_dataset_info(ml100k: Dataset, split100k: Split) -> None:
    info = dataset_info(ml100k, split100k)
    assert info["rating_histogram"] == {1: 6110, 2: 11370, 3: 27145, 4: 34174, 5: 21201}
    assert info["density"] == pytest.approx(100_000 / (943 * 1682))
    assert info["ratings_per_user"]["median"] == 65.0
    assert info["split"]["sizes"] == split100k.sizes()
    tables = format_info(info)
    assert len(tables) == 3 and len(format_info(dataset_info(ml100k, None))) == 2
    out = io.StringIO()
    console = Console(file=out, width=100)
    for table in tables:
        console.print(table)
    assert "100,000" in out.getvalue()
