"""Every prompt the agent and the trainers use, assembled from ``agents.text`` blocks.

A prompt is a list of newline-terminated segments: ``[persona block, page block, tail]``. The
first two are the cacheable prefix (persona across pages, page across candidate actions); the
tail plus one candidate line is what gets scored or trained on.
"""

from __future__ import annotations

INSTRUCTION = ("You are this person, browsing a movie recommender page by page. For each movie "
               "on the page decide to watch or skip it, rate what you watch from 1 to 5, then "
               "go to the next page or exit.\n")
CHOICES = "Your choices:\n"
NEXT_STATE = "What happens next:\n"
THINK = "Why:\n"


def persona_block(persona_text: str) -> str:
    return persona_text.rstrip("\n") + "\n" + INSTRUCTION


def prefix(persona_text: str, page_text: str) -> str:
    """The cached prefix every page's scoring shares: persona block, then page block."""
    return persona_block(persona_text) + page_text


def policy_tail(predictions: str = "", reflection: str | None = None) -> str:
    """What comes between the page and the first choice line."""
    why = f"{THINK}{reflection.rstrip()}\n" if reflection else ""
    return predictions + why + CHOICES


def world_model_tail(wm_action: str) -> str:
    return CHOICES + wm_action + NEXT_STATE


def reflection_tail(predictions: str = "") -> str:
    """Where a reflection is generated or trained: after the page, before the choices."""
    return predictions + THINK


_AFTER_SESSION = "{persona}\nYou just finished browsing a movie recommender.\n{session}\n"
# The post-session interview: the free-text reason (only with a text model) ...
INTERVIEW = (_AFTER_SESSION + "How satisfied are you with the recommendations, from 1 to 10, "
             "and why? Answer in one sentence.\n")
# ... and the satisfaction score, an enumerated answer (``satisfaction_option``). Asked as
# "Satisfaction (1-10): " the shipped agent put 79% on "1" and its score fell as the likes
# per page rose (Spearman -0.23 over 80 sessions); this wording rises with them
# (``bench/bench_interview.py``).
SATISFACTION = (_AFTER_SESSION + "On a scale of 1 to 10, how satisfied are you with the "
                "recommendations?\n")
SATISFACTION_TAIL = "Answer: I would rate them "


def satisfaction_option(score: int) -> str:
    """One answer of the satisfaction scale. No answer is a token prefix of another: a bare
    "1" is one of "10", and its score would hold every answer starting with 1."""
    return f"{score} out of 10"

JUDGE = ("You judge whether a recommender session was produced by a real person. Rubric: 5 = "
         "indistinguishable from a real person (choices fit the persona, plausible number of "
         "watches, sensible ratings and exit), 1 = clearly artificial.\nPersona:\n{persona}\n"
         "Session:\n{session}\nScore (1-5): ")

JUDGE_RETRY = "Your last answer was not valid: {error}\nAnswer again with one score from 1 to 5."

TEACHER = ("{persona}\n{page}A real person chose:\n{human}\nAlternatives and what a world model "
           "predicts for each:\n{alternatives}\nIn three short sentences explain why the person's "
           "choice is better in this context, fits the persona, and leads to a better future "
           "than the alternatives.\n")

# The chat policy (agents.chat_policy): a chat model answers each page with a structured action.
CHAT_POLICY = (INSTRUCTION + "Movies are named by their number on the page, [1] to [{n}]. "
               "Watch only the movies you would really watch (often none), rate each one you "
               "watch as you would after seeing it, and exit when you would stop browsing.\n")
CHAT_ANSWER = "Your choices on this page: the movies you watch with their ratings, then next/exit."
CHAT_SLOT = "the number [n] of a movie on this page"
CHAT_RATING = "your rating of it after watching, 1 (hated) to 5 (loved)"
CHAT_WATCHED = "the movies you watch (empty if none)"
CHAT_THEN = "next: see another page; exit: stop browsing"
CHAT_RETRY = ("Your last answer was not valid: {error}\nAnswer again, naming only movies [1] to "
              "[{n}] once each with a rating from 1 to 5, then next or exit.")
