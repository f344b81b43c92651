"""Inventory: the apps a host carries (app key, group, list, auto-deploy) and where they come
from, the config file or the original platform's MariaDB table. It knows nothing of the config
file's layout, of copying or of the daemon; it hands out plain, immutable app records.
"""
