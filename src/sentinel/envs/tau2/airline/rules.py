"""Airline's reservation rules: the one table the policy signals and the grounder read.

tau2 airline's reservations carry `status: null` while active and `"cancelled"` once
`cancel_reservation` ran; its tools do not check it, but the policy only lets the agent
cancel or change a live reservation. The pack calls a null status `ACTIVE`
(`Airline.null_status`, which `Entities` gives such records), so the signals flag a write on
a reservation already cancelled, in the database or earlier in the same trajectory; the
grounder reads `status or ACTIVE`.

What else the policy asks (nothing flown, basic economy keeps its flights, bags only added,
the passenger count kept, who may cancel) depends on flights and dates, not on one entity's
status, so the grounder checks it (`airline.policy`), not this table.
"""

from sentinel.envs.pack import StateRule

ACTIVE = "active"  # a reservation whose `status` is null
CANCELLED = "cancelled"

RULES = (
    StateRule("cancel_reservation", "reservation_id", ACTIVE, after=CANCELLED),
    StateRule("update_reservation_flights", "reservation_id", ACTIVE),
    StateRule("update_reservation_baggages", "reservation_id", ACTIVE),
    StateRule("update_reservation_passengers", "reservation_id", ACTIVE),
)
