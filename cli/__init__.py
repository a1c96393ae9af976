"""The ``vlpet-fx`` command line (installed as ``vlpet_fx.cli``): argument parsing and printing only;
all work is done by the :mod:`vlpet_fx` API."""
