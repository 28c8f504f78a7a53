def run(main) -> None:
    """A torchrun worker's entry: main(*argv), then its process group destroyed in order (at the
    interpreter's exit gloo's threads may abort the process: "terminate called without an active
    exception")."""
    import sys

    from engine.runtime import distributed

    main(*sys.argv[1:])
    distributed.teardown(always=True)
