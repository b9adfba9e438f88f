"""Plugins for mjfilter's own tests, installed through entry points like any plugin."""
