"""Daemon: the long-running service. It watches the source areas, debounces changes per app,
schedules syncs through the engine, keeps the record of what was published, serves the control
plane and talks to systemd. It is the only layer that ties the others together.
"""
