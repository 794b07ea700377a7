from bigmerge.cli import entry

entry()
