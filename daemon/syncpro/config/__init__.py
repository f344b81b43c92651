"""Configuration, in borgmatic's steps: `model` (the frozen settings, each default once; all the
engine sees), `schema` (how each key is read and what it means), `load` (find the file, parse the
YAML, convert by the schema), `checks` (rules between keys) and `import_original` (the original
platform's config). It imports the inventory's data model, nothing of the engine or the daemon.
"""
