"""Bookkeeping shared by the stand-in peft package and the pytest plugin."""

CURRENT = {"test": None}
INTERNAL_USED: dict = {}
OTHER_METHOD_USED: dict = {}


def _note(table, what):
    test = CURRENT["test"]
    if test is not None:
        table.setdefault(test, set()).add(what)


class PeftInternalUsed(NotImplementedError):
    """A case used something of PEFT that is not its public API."""


class _InternalMeta(type):
    def _touch(cls):
        _note(INTERNAL_USED, cls.__qualname__)
        raise PeftInternalUsed(f"peft internal {cls.__qualname__} used")

    def __instancecheck__(cls, obj):
        cls._touch()

    def __subclasscheck__(cls, sub):
        cls._touch()

    def __call__(cls, *args, **kwargs):
        cls._touch()

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return internal(f"{cls.__qualname__}.{name}")

    def __iter__(cls):
        cls._touch()

    def __getitem__(cls, key):
        cls._touch()

    def __contains__(cls, key):
        cls._touch()


def internal(name):
    """A placeholder class for PEFT internal ``name`` (classes may subclass it at import time)."""
    return _InternalMeta(name, (), {"__qualname__": name})


class OtherMethodConfig:
    """Placeholder for the config of a method deltatune does not implement."""

    _name = "other"

    def __init__(self, *args, **kwargs):
        _note(OTHER_METHOD_USED, self._name)
        self.args, self.kwargs = args, kwargs

    def __getattr__(self, name):
        _note(OTHER_METHOD_USED, self._name)
        raise AttributeError(f"{self._name} is not implemented by deltatune ({name})")


def other_method(name):
    cls = type(name, (OtherMethodConfig,), {"_name": name})
    return cls


def missing_public(name):
    def missing(*args, **kwargs):
        raise NotImplementedError(f"deltatune has no public {name}")

    missing.__name__ = name
    return missing
