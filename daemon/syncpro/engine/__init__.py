"""Engine: one sync from request to response document. It selects apps, maps them to source and
target paths, walks and copies the sources, publishes each target atomically and reports the
result in the original schema. It imports no daemon, control plane, watcher, socket, database
driver or YAML: the CLI, the daemon and the control plane all call it the same way.
"""
