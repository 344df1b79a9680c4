"""Chatting with a run: terminal, local web page + JSON API, which model to load."""
