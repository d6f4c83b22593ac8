"""`python -m biomedsynth`: the `biomedsynth` command; how a multi-process launch starts its workers."""
from biomedsynth.cli import app

if __name__ == "__main__":
    app(prog_name="biomedsynth")
