"""`python -m service`: hold early signals, then run the command (service.command)."""

from service import signals

if __name__ == "__main__":
    signals.hold()
    from service.command import main

    main()
