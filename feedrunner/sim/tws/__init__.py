"""TWS API simulator: the real ib_async client judges its fidelity, since TWS itself cannot run here.

    async with TwsSim(seed=1, rate=5.0) as sim:          # 127.0.0.1, port 0 -> sim.port
        await IB().connectAsync("127.0.0.1", sim.port, clientId=1)

Faults (duration in seconds; `symbol` is a contract key such as "AAPL" or "EUR.USD"):
drop / reset (FIN / RST every socket), restart (also refuse connects for `duration`, then listen on the
same port), refuse (ECONNREFUSED for `duration`, live sockets kept), stall (no ticks, requests still
answered), reject_symbol (error 200), malformed (junk tick frames), link_lost (1100, then 1101 with
subscriptions dropped or 1102 via `sim.link_lost(d, data_lost=...)`), `sim.farm_lost(d)` (2103/2104) and
`sim.deny_market_data(key, code)` (354 / 10197 for one contract) and `sim.history_unavailable(d)` (162).
The market keeps trading while nobody is subscribed or data is held back (for `keep_trading` seconds),
onto a tape that reqHistoricalTicks (TRADES) serves and `sim.prints(key)` exposes to tests.
Lasting faults follow FaultBox: duration 0 means no effect. gap and ratelimit have no TWS meaning here.
Call inject from the loop's thread (loop.call_soon_threadsafe from elsewhere).
"""

from .contracts import DEFAULT_CONTRACTS, Catalogue, ContractSpec
from .server import TwsSim, run_standalone, venue_snippet

__all__ = ["DEFAULT_CONTRACTS", "Catalogue", "ContractSpec", "TwsSim", "run_standalone", "venue_snippet"]
