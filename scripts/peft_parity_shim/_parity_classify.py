"""How a case's outcome is classified (pure: no pytest, no peft, no deltatune; unit-tested on its own)."""

#: Every status a case can end in. In scope: passed, failed, internal. Left aside: the others.
STATUSES = ("passed", "failed", "internal", "needs_network", "out_of_scope", "skipped")

#: Attributes of PEFT's layer and config classes that are implementation details (not its public API).
PRIVATE_ATTRIBUTES = ("adapter_layer_names", "_restore_weights", "_register_custom_module", "_active_adapter")

#: Text of the errors a case gets when it needs the Hub (the guard's own, huggingface_hub's, transformers').
NETWORK_TEXT = (
    "NetworkNeeded",
    "parity: network needed",
    "OfflineModeIsEnabled",
    "LocalEntryNotFound",
    "HF_HUB_OFFLINE",
    "offline mode",
    "couldn't connect to 'https://huggingface.co'",
)


def needs_network(typename: str, message: str) -> bool:
    text = f"{typename} {message}"
    return any(s in text for s in NETWORK_TEXT)


def private_attribute(typename: str, message: str) -> bool:
    """A private attribute of PEFT's classes, or any attribute of one of PEFT's modules (``mock.patch(
    "peft.config.__version__")``): the stand-in modules have only PEFT's public names."""
    if "'_InternalMeta'" in message:  # an internal constant used in arithmetic, ...
        return True
    if typename != "AttributeError":
        return False
    return "<module 'peft." in message or any(f"attribute '{a}'" in message for a in PRIVATE_ATTRIBUTES)


def classify(
    *,
    passed: bool,
    skipped: bool,
    typename: str = "",
    message: str = "",
    out_of_scope: bool = False,
    network: bool = False,
    internal: bool = False,
) -> str:
    """One status of STATUSES for a finished case.

    ``out_of_scope``: the case touched a method deltatune does not cover (whatever its outcome);
    ``network``: it tried to reach the network; ``internal``: it used one of PEFT's internals.
    A case that passes is ``passed`` even if it tried the network or touched an internal on the way.
    """
    if out_of_scope:
        return "out_of_scope"
    if skipped:
        return "skipped"
    if passed:
        return "passed"
    if network or needs_network(typename, message):
        return "needs_network"
    if internal or private_attribute(typename, message):
        return "internal"
    return "failed"
