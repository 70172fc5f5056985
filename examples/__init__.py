"""Bringing one's own recommender: ``--recommenders examples.my_recommender:factory``."""
