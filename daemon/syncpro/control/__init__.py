"""Control plane: the unix-socket protocol and server, the legacy HTTP endpoint and the `ctl`
client. It parses and authorises requests and hands them to whatever implements its handler
protocol; it never imports the daemon, which plugs itself in.
"""
