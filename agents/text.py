"""The one place where states, actions and next states become text (and back).

Both the running agent and the training package import these renderers, so a model is always
scored on exactly the format it was trained on. Items are named by their slot on the page
(``[1]``..``[k]``). Every choice is one whole line (``[2] watch``, ``[2] rated 4``,
``then: next``): candidate lines are scored after a context that ends in a newline, and a
newline never merges with the next token, so scoring and training tokenise identically.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, Field

WATCH, SKIP = "watch", "skip"
RATINGS = ("1", "2", "3", "4", "5")
THEN = ("next", "exit")
SESSION_SHOWN = 4  # latest session watches shown on a page; older ones are counted


class Evidence(BaseModel):
    """A past item of this person that resembles a page item, with the rating they gave it."""

    title: str
    rating: int
    similarity: float


class ItemView(BaseModel):
    """What the agent perceives of one item: public facts plus its own history."""

    id: int
    title: str
    year: int | None = None
    genres: tuple[str, ...] = ()
    popularity: int = Field(0, description="ratings in the train split")
    mean_rating: float | None = None
    evidence: list[Evidence] = Field(default_factory=list)
    match: int | None = Field(None, description="0-100: how strongly the item matches this "
                              "person's history (collaborative score percentile, memory.evidence); "
                              "None = not perceived")
    close_watched: int = Field(0, description="of the item's 20 closest items, how many the "
                               "person watched")
    close_rating: float | None = Field(None, description="their mean rating of those")
    likely_rating: float | None = Field(None, description="item-kNN rating from their ratings "
                                        "of its neighbours (memory.evidence knn_rating)")

    def personal(self) -> bool:
        return bool(self.evidence) or self.match is not None

    def label(self) -> str:
        return f"{self.title} ({self.year})" if self.year else self.title


class PageView(BaseModel):
    page: int
    max_pages: int
    items: list[ItemView]
    session: list[tuple[str, int]] = Field(default_factory=list,
                                           description="(title, rating) watched this session")
    memories: list[str] = Field(default_factory=list)


def closest(it: ItemView) -> str:
    """How many of the item's 20 closest items the person watched, and their mean rating."""
    return f"you watched {it.close_watched} of its 20 closest" + (
        f", rated {it.close_rating:.1f}" if it.close_rating is not None else "")


def render_item(slot: int, it: ItemView) -> str:
    stats = f"{it.popularity} ratings" + (f", avg {it.mean_rating:.1f}" if it.mean_rating else "")
    line = f"[{slot}] {it.label()} | {', '.join(it.genres) or 'unknown genre'} | {stats}"
    if it.match is not None:
        line += f"\n    match {it.match}/100; {closest(it)}"
    if it.evidence:
        seen = "; ".join(f"{e.title} {e.rating}/5" for e in it.evidence)
        line += f"\n    like what you rated: {seen}"
    elif it.match is not None:
        line += "\n    like what you rated: nothing you watched"
    return line


def render_page(view: PageView) -> str:
    """The per-page part of a prompt; the persona prefix is rendered by ``agents.persona``."""
    parts = [f"Page {view.page} of at most {view.max_pages}."]
    if view.session:
        recent = view.session[-SESSION_SHOWN:]
        more = len(view.session) - len(recent)
        parts.append("Watched this session: " + (f"{more} more, then " if more else "")
                     + "; ".join(f"{t} {r}/5" for t, r in recent) + ".")
    if view.memories:
        parts.append("You remember: " + " | ".join(view.memories))
    parts.append("On this page:")
    parts += [render_item(s, it) for s, it in enumerate(view.items, 1)]
    return "\n".join(parts) + "\n"


def page_prompt(page: int, max_pages: int, views: Sequence[ItemView],
                session: Sequence[tuple[str, int]] = (), memories: Sequence[str] = (),
                evidence: bool = True) -> str:
    """One page as every caller shows it; ``evidence=False`` is the no-memory ablation."""
    if not evidence:
        views = public(views)
    return render_page(PageView(page=page, max_pages=max_pages, items=list(views),
                                session=list(session), memories=list(memories)))


def public(views: Sequence[ItemView]) -> list[ItemView]:
    """The no-memory ablation's views: public facts only, nothing of the person's history."""
    return [v.model_copy(update={"evidence": [], "match": None, "close_watched": 0,
                                 "close_rating": None, "likely_rating": None}) for v in views]


def item_cue(it: ItemView) -> str:
    """An item's personal numbers, restated on the line just above its watch/skip answer.

    On the page an item's numbers sit several lines (and other items) away from its answer; a
    small model trained on that binds the cue to the wrong slot or not at all. Repeated next to
    the answer, the cue needs no long-range lookup."""
    cue = it.label()
    if it.match is not None:
        cue += f": match {it.match}/100, {closest(it)}"
    return cue


def page_cues(views: Sequence[ItemView], evidence: bool = True) -> list[str]:
    return [item_cue(v) for v in (views if evidence else public(views))]


def rating_cue(it: ItemView) -> str:
    """An item's rating evidence, restated on the line just above its rating answer.

    Without it the rating lines sit below the choices, far from the item's numbers, and an
    adapter rated every item of a page alike (the person's usual rating); a regression on the
    person's mean, the item's mean and the closest items' mean rates held-out items better than
    matrix factorisation (``bench/bench_ratings.py``). The item-kNN rating then sums that
    evidence into one number, which alone rates them better still."""
    cue = it.label() + (f": avg {it.mean_rating:.1f}" if it.mean_rating else "")
    if it.close_rating is not None:
        cue += f"; {closest(it)}"
    if it.likely_rating is not None:
        cue += f"; from your ratings you would likely rate it {it.likely_rating:.1f}"
    return cue


def page_rating_cues(views: Sequence[ItemView], evidence: bool = True) -> list[str]:
    return [rating_cue(v) for v in (views if evidence else public(views))]


def cue_line(slot: int, cue: str, expected: float | None = None) -> str:
    """The context line a slot's watch/skip line is scored and trained after."""
    exp = f"; you expect to rate {expected:.1f}" if expected is not None else ""
    return f"[{slot}] {cue}{exp}\n"


def render_predictions(predictions: Mapping[int, float]) -> str:
    """The world model's expected rating per slot, placed before the choices."""
    if not predictions:
        return ""
    return "You expect to rate: " + ", ".join(
        f"[{s}] {r:.1f}" for s, r in sorted(predictions.items())) + "\n"


def slot_line(slot: int, choice: str) -> str:
    return f"[{slot}] {choice}\n"


def rating_stem(slot: int) -> str:
    """The part of a rating line shared by all five ratings (it ends at a token boundary)."""
    return f"[{slot}] rated"


def rating_value(rating: int | str) -> str:
    return f" {rating}\n"


def rating_line(slot: int, rating: int | str) -> str:
    return rating_stem(slot) + rating_value(rating)


def ratings_lines(ratings: Mapping[int, int]) -> str:
    return "".join(rating_line(s, r) for s, r in sorted(ratings.items()))


def then_line(then: str) -> str:
    return f"then: {then}\n"


def render_choices(n_slots: int, watched_slots: Sequence[int]) -> str:
    return "".join(slot_line(s, WATCH if s in watched_slots else SKIP)
                   for s in range(1, n_slots + 1))


def render_action(n_slots: int, ratings: Mapping[int, int], then: str) -> str:
    """The policy's full action: slot choices, next/exit, then the ratings of watched slots.

    next/exit comes before the ratings so that it and every rating can be scored in one batched
    forward after the choices (``agents.decide``)."""
    return render_choices(n_slots, list(ratings)) + then_line(then) + ratings_lines(ratings)


def render_wm_action(n_slots: int, watched_slots: Sequence[int], then: str) -> str:
    """The world model's input action: what is watched and whether to go on, without ratings."""
    return render_choices(n_slots, watched_slots) + then_line(then)


NEXT_PAGE = "next page"
NEXT_GENRES = "next page genres: "
WM_FORMATS = ("titles", "genres")


def page_stem(page_format: str) -> str:
    """How a next page's line begins in ``page_format`` (one of ``WM_FORMATS``), before what
    the page holds: the world model is trained on it and decoded from it."""
    if page_format not in WM_FORMATS:
        raise ValueError(f"next-state format {page_format!r}: one of {', '.join(WM_FORMATS)}")
    return NEXT_GENRES if page_format == "genres" else f"{NEXT_PAGE}: "


def render_next_state(ratings: Mapping[int, int], next_items: Sequence[ItemView] | None,
                      page_format: str = "titles") -> str:
    """What follows an action: the ratings it leads to and the next page (or the end).

    ``titles`` names each next item with its genres (the shipped adapters' world model);
    ``genres`` names only the next page's genre mix, sorted: the titles depend on the
    recommender, which the state does not show, so a world model that guesses them is wrong
    on every title it writes."""
    stem = page_stem(page_format)
    if next_items is None:
        page = f"{NEXT_PAGE}: none, the session ends\n"
    elif page_format == "genres":
        page = stem + ", ".join(sorted({g for it in next_items for g in it.genres})) + "\n"
    else:
        page = stem + "; ".join(
            f"{it.label()} [{', '.join(it.genres)}]" for it in next_items) + "\n"
    return ratings_lines(ratings) + page


class NextState(BaseModel):
    ratings: dict[int, int] = Field(default_factory=dict)
    ends: bool = False
    titles: list[str] = Field(default_factory=list)
    genres: list[str] = Field(default_factory=list)

    def fields(self) -> set[tuple]:
        """Fields scored by next-state F1: ratings given, next-page titles and genres."""
        out: set[tuple] = {("rating", s, r) for s, r in self.ratings.items()}
        out |= {("end", self.ends)}
        out |= {("title", t) for t in self.titles}
        out |= {("genre", g) for g in self.genres}
        return out


_RATING = re.compile(r"^\[(\d+)\] rated ([1-5])\s*$")
_PAGE_ITEM = re.compile(r"\s*(.+?)\s*\[([^\]]*)\]\s*$")


def parse_next_state(text: str) -> NextState:
    """Read back a (possibly generated) next-state text; unreadable parts are simply empty."""
    ns = NextState()
    for line in text.splitlines():
        m = _RATING.match(line)
        if m:
            ns.ratings[int(m.group(1))] = int(m.group(2))
        elif line.startswith(NEXT_GENRES):
            ns.genres += [g.strip() for g in line[len(NEXT_GENRES):].split(",") if g.strip()]
        elif line.startswith("next page:"):
            body = line[len("next page:"):].strip()
            # the end marker carries no "[genres]", which every item of a page does (a film
            # whose title starts with "none" is a page, not the end)
            if body.startswith("none") and "[" not in body:
                ns.ends = True
                continue
            for chunk in body.split(";"):
                m = _PAGE_ITEM.match(chunk)
                if m:
                    ns.titles.append(m.group(1))
                    ns.genres += [g.strip() for g in m.group(2).split(",") if g.strip()]
    ns.genres = sorted(set(ns.genres))
    return ns


def parse_generated_state(generated: str) -> NextState:
    """A generated next state up to its first next-page line: a model that goes on writes
    more states after it, which are not this one's."""
    kept = []
    for line in generated.splitlines():
        kept.append(line)
        if line.startswith(NEXT_PAGE):
            break
    return parse_next_state("\n".join(kept))


def memory_note(page: int, watched: Sequence[tuple[str, int]], skipped: Sequence[str],
                then: str) -> str:
    """What an agent remembers of one page (the episodic memory's text)."""
    seen = [f"watched {title} and rated it {r}/5" for title, r in watched]
    return (f"Page {page}: " + ("; ".join(seen) or "watched nothing")
            + (f"; skipped {', '.join(skipped)}" if skipped else "") + f"; then {then}.")


def session_summary(n_pages: int, ratings: Sequence[int]) -> str:
    """A finished session as the post-session interview shows it: the counts and the mean a
    small model can read, not the list of every rating (with the list, the shipped agent's
    satisfaction fell as the number of movies watched rose, Spearman -0.36 over 250 sessions;
    with the counts -0.03, ``bench/bench_interview.py``)."""
    if not ratings:
        return f"You saw {n_pages} page(s) of recommendations and watched none of them."
    liked = sum(r >= 4 for r in ratings)
    return (f"You saw {n_pages} page(s) of recommendations, watched {len(ratings)} movie(s) and "
            f"liked {liked} of them (rated 4 or 5); your average rating was "
            f"{sum(ratings) / len(ratings):.1f} out of 5.")


def describe_session(pages: Sequence[Mapping], titles: Mapping[int, str]) -> str:
    """A whole session (page records in their JSON form) as the judge reads it."""
    lines = []
    for p in pages:
        watched = ", ".join(f"{titles[int(i)]} ({r}/5)" for i, r in p["watched"].items())
        lines.append(f"page {p['page']}: shown {len(p['items'])}, watched "
                     f"{watched or 'nothing'}; then {p['then']}")
    return "\n".join(lines)
