"""Container and command-line entry point: the same click app as the `tiny-audio` console script."""

from tiny_audio.cli import main

if __name__ == "__main__":
    main()
