"""mjfilter's built-in plugins (installed as the package ``mjfilter_plugins``).

Each registers through the ``mjfilter.plugins`` entry-point group, exactly as a
third-party plugin does, and is loaded only when the configuration names it.
"""
