"""Bookkeeping shared by the stand-in peft package and the pytest plugin."""

CURRENT = {"test": None}
INTERNAL_USED: dict = {}
OTHER_METHOD_USED: dict = {}
MISSING_USED: dict = {}
NETWORK_USED: dict = {}

#: Hosts a case may resolve without needing the network (torch.distributed's rendezvous, local servers).
LOCAL_HOSTS = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0"}


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
        full = f"{cls.__qualname__}.{name}"
        counterpart = COUNTERPART_OF(full)  # deltatune's object for it, where one does its job
        return internal(full) if counterpart is None else counterpart

    def __iter__(cls):
        cls._touch()

    def __getitem__(cls, key):
        cls._touch()

    def __contains__(cls, key):
        cls._touch()


#: ``fullname`` -> deltatune's counterpart of a PEFT internal, or None; set by _parity_finder (its table).
COUNTERPART_OF = lambda fullname: None  # noqa: E731


def internal(name):
    """A placeholder class for PEFT internal ``name`` (classes may subclass it at import time)."""
    return _InternalMeta(name, (), {"__qualname__": name})


class _OtherMethodMeta(type):
    def __getattr__(cls, name):  # a class attribute it lacks (dataclasses.fields(VeraConfig), ...)
        if not name.startswith("_pytest") and name != "pytestmark":
            _note(OTHER_METHOD_USED, cls._name)
        raise AttributeError(f"{cls._name} is not implemented by deltatune ({name})")


class OtherMethodConfig(metaclass=_OtherMethodMeta):
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


class MissingFeatureConfig:
    """Placeholder for a config of a LoRA feature deltatune lacks (EvaConfig, CordaConfig, KasaConfig, ...).

    Such a case stays in scope: it is a LoRA case that fails for want of the feature. Building the placeholder
    works (PEFT's test modules build some at import time); using it raises ``NotImplementedError``.
    """

    _name = "missing"

    def __init__(self, *args, **kwargs):
        _note(MISSING_USED, self._name)
        self.args, self.kwargs = args, kwargs

    def __getattr__(self, name):
        _note(MISSING_USED, self._name)
        raise NotImplementedError(f"deltatune has no public {self._name} ({name})")


def missing_feature(name):
    return type(name, (MissingFeatureConfig,), {"_name": name})


class NetworkNeeded(RuntimeError):
    """A case tried to reach the network (the Hugging Face Hub); not an OSError, so nothing retries it."""


def install_network_guard(hub=True):
    """Every name resolution of a non-local host raises NetworkNeeded at once and is recorded for the case;
    with ``hub``, so are huggingface_hub's offline-mode and not-in-cache errors (raised without a socket
    under HF_HUB_OFFLINE).
    """
    import socket

    original = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            _note(NETWORK_USED, str(host))
            raise NetworkNeeded(f"parity: network needed to reach {host}")
        return original(host, *args, **kwargs)

    socket.getaddrinfo = guarded
    if not hub:
        return
    try:
        from huggingface_hub import errors
    except ImportError:
        return
    for cls in (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError):
        init = cls.__init__

        def noting(self, *args, _init=init, _name=cls.__name__, **kwargs):
            _note(NETWORK_USED, _name)
            _init(self, *args, **kwargs)

        cls.__init__ = noting


class _MissingMeta(type):
    """A public name of peft that deltatune lacks: calling it, reading from it or checking against it raises."""

    def _missing(cls):
        raise NotImplementedError(f"deltatune has no public {cls.__qualname__}")

    def __call__(cls, *args, **kwargs):
        cls._missing()

    def __getattr__(cls, name):
        if name.startswith("_") or name == "pytestmark":  # introspection (pytest's collection, copy, ...)
            raise AttributeError(name)
        cls._missing()

    def __instancecheck__(cls, obj):
        cls._missing()

    def __subclasscheck__(cls, sub):
        cls._missing()

    def __getitem__(cls, key):
        cls._missing()

    def __iter__(cls):
        cls._missing()


def missing_public(name):
    return _MissingMeta(name, (), {"__qualname__": name})


#: Configs of LoRA features (initialisers, variants) deltatune lacks: their cases stay in scope and fail.
#: Every other config deltatune lacks is another method's (VeRA, BOFT, prompt tuning, trainable tokens...).
LORA_FEATURE_CONFIGS = {
    "ArrowConfig",
    "BdLoraConfig",
    "CordaConfig",
    "EvaConfig",
    "KasaConfig",
    "LoftQConfig",
    "LoraGAConfig",
    "LoraRuntimeConfig",
    "MontecloraConfig",
    "MontecloraSampler",
    "BufferedMontecloraSampler",
    "VeloraConfig",
}


def placeholder_for(name):
    """What a name of peft that deltatune lacks stands for: a LoRA feature, another method, or missing API."""
    if name in LORA_FEATURE_CONFIGS:
        return missing_feature(name)
    if name.endswith(("Config", "Sampler")):
        return other_method(name)
    return missing_public(name)
