"""`alignuser train` and `alignuser evaluate`: flags onto the training and evaluation configs."""

from __future__ import annotations

import argparse


def add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="world-model and counterfactual training")
    t.set_defaults(func=lambda a: 1)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="fidelity to held-out humans and recommender selection")
    e.set_defaults(func=lambda a: 1)
