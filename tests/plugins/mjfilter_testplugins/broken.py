"""``test-broken``: fails to import, so the error message can be checked."""

raise ImportError("this plugin is broken on purpose")
