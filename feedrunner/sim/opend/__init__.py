"""A local FutuOpenD speaking the real wire protocol, so the real futu-api client judges its fidelity."""

from .catalogue import DEFAULT_SECURITIES, Security
from .protocol import ProtoId, SubType
from .server import MALFORMED_KINDS, OpenDSim, run_standalone, venue_snippet

__all__ = [
    "DEFAULT_SECURITIES",
    "MALFORMED_KINDS",
    "OpenDSim",
    "ProtoId",
    "Security",
    "SubType",
    "run_standalone",
    "venue_snippet",
]
