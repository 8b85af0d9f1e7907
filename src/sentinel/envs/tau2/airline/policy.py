"""Airline's database as entities, and the writes its policy allows on them ("moves").

tau2's airline tools check little (a cancelled reservation can be cancelled again, any
flights can replace any others), so what a write may do is read from the policy: nothing
flown, basic economy keeps its flights (its cabin may change), origin and destination stay,
bags are only added, the passenger count stays, a cancellation needs a business cabin, a
booking within 24 hours, insurance or a flight the airline cancelled, and compensation is
$100 per passenger for a cancelled flight, for silver or gold members, business or insured
trips. What the tools do check is checked too: available flights with free seats, payment
methods of the user (no certificate for a change; a gift card must cover the amount), and a
booking's payment equal to its price.

A `Move` is one such write with all its arguments: the grounder offers them as schema
branches, and mutation puts them in place of a seed's writes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from pydantic import Field

from sentinel.envs.tau2.airline.rules import ACTIVE, RULES
from sentinel.schemas.message import Strict

JSON = dict[str, Any]
TODAY = "2024-05-15"  # the policy's "current time" is 2024-05-15 15:00 EST
YESTERDAY_NOW = "2024-05-14T15:00:00"  # bookings after this are within 24 hours
CABINS = ("basic_economy", "economy", "business")
FREE_BAGS = {  # free checked bags per passenger, by membership and cabin
    "regular": {"basic_economy": 0, "economy": 1, "business": 2},
    "silver": {"basic_economy": 1, "economy": 2, "business": 3},
    "gold": {"basic_economy": 2, "economy": 3, "business": 4},
}
FLOWN = {"landed", "flying"}
MAX_PER_RESERVATION = 3  # moves of one tool on one reservation
BOOK_DATES = ("2024-05-20", "2024-05-24", "2024-05-28")  # offered booking dates
ALLOWED = {r.tool: r.allows for r in RULES}  # reservation statuses each write accepts


class Segment(Strict):
    flight_number: str
    origin: str
    destination: str
    date: str
    price: int

    def text(self) -> str:
        return f"{self.flight_number} {self.origin}->{self.destination} {self.date} ${self.price}"


class Passenger(Strict):
    first_name: str
    last_name: str
    dob: str

    def text(self) -> str:
        return f"{self.first_name} {self.last_name} ({self.dob})"


class PaymentMethod(Strict):
    id: str
    source: str  # credit_card, gift_card or certificate
    balance: float | None = None  # gift cards and certificates

    def text(self) -> str:
        return self.id if self.balance is None else f"{self.id} (${self.balance:g})"


class GroundedReservation(Strict):
    reservation_id: str
    status: str
    origin: str
    destination: str
    flight_type: str
    cabin: str
    segments: list[Segment]
    passengers: list[Passenger]
    created_at: str
    total_baggages: int
    nonfree_baggages: int
    insurance: str

    def text(self) -> str:
        head = (
            f"Reservation {self.reservation_id} [{self.status}] {self.flight_type} "
            f"{self.origin}->{self.destination}, {self.cabin}, booked {self.created_at}, "
            f"bags {self.total_baggages} ({self.nonfree_baggages} paid), "
            f"insurance {self.insurance}"
        )
        people = "; ".join(p.text() for p in self.passengers)
        return "\n".join(
            [head, *(f"  {s.text()}" for s in self.segments), f"  passengers: {people}"]
        )


class GroundedUser(Strict):
    user_id: str
    name: str
    email: str
    membership: str
    payment_methods: list[PaymentMethod]
    saved_passengers: list[Passenger]
    reservations: list[str]


class Move(Strict):
    """One write the policy allows, with all its arguments."""

    tool: str
    kind: str  # cancel, swap, cabin, bags, passenger, book or certificate
    arguments: JSON  # payment ids are the first of `payers`
    payers: list[str] = Field(default_factory=list)  # payment method ids the write accepts
    reservation_id: str | None = None  # the reservation it acts on
    request: str  # what the customer asks for, in a sentence

    def text(self) -> str:
        payers = f" (pay with {' or '.join(self.payers)})" if self.payers else ""
        return f"{self.tool}: {self.request}{payers}"


class AirlineData:
    """The airline database indexed once, and the moves each user's entities allow."""

    def __init__(self, database: JSON) -> None:
        self.users: dict[str, JSON] = database["users"]
        self.reservations: dict[str, JSON] = database["reservations"]
        self.flights: dict[str, JSON] = database["flights"]
        self.routes: dict[tuple[str, str], list[str]] = defaultdict(list)
        for number, f in sorted(self.flights.items()):
            self.routes[(f["origin"], f["destination"])].append(number)

    # -- entities as models

    def user(self, user_id: str) -> GroundedUser:
        u = self.users[user_id]
        methods = [
            PaymentMethod(id=m["id"], source=m["source"], balance=m.get("amount"))
            for m in u["payment_methods"].values()
        ]
        return GroundedUser(
            user_id=user_id, name=f"{u['name']['first_name']} {u['name']['last_name']}",
            email=u["email"], membership=u["membership"], payment_methods=methods,
            saved_passengers=[Passenger(**p) for p in u["saved_passengers"]],
            reservations=list(u["reservations"]),
        )  # fmt: skip

    def reservation(self, reservation_id: str) -> GroundedReservation:
        r = self.reservations[reservation_id]
        keep = ("origin", "destination", "flight_type", "cabin", "created_at", "insurance")
        return GroundedReservation(
            reservation_id=reservation_id, status=r.get("status") or ACTIVE,
            segments=[Segment(**s) for s in r["flights"]],
            passengers=[Passenger(**p) for p in r["passengers"]],
            total_baggages=r["total_baggages"], nonfree_baggages=r["nonfree_baggages"],
            **{k: r[k] for k in keep},
        )  # fmt: skip

    def day(self, flight_number: str, date: str) -> JSON:
        return dict(self.flights[flight_number]["dates"].get(date, {"status": "unknown"}))

    def bookable(self, flight_number: str, date: str, cabin: str, seats: int) -> int | None:
        """The flight's price on `date` in `cabin` if it can take `seats` passengers."""
        day = self.day(flight_number, date)
        if day["status"] != "available" or day["available_seats"][cabin] < seats:
            return None
        return int(day["prices"][cabin])

    # -- what the policy allows

    def moves(self, user_id: str, tool: str) -> list[Move]:
        """Every move of `tool` on the user's entities, in a fixed order."""
        user = self.user(user_id)
        if tool == "book_reservation":
            return list(self._bookings(user))
        if tool == "send_certificate":
            return list(self._certificates(user))
        if tool not in ALLOWED:
            return []
        found: list[Move] = []
        for rid in user.reservations:
            r = self.reservation(rid)
            if ALLOWED[tool](r.status) and not self._flown(r):
                found += list(self._reservation_moves(user, r, tool))[:MAX_PER_RESERVATION]
        return found

    def _reservation_moves(
        self, user: GroundedUser, r: GroundedReservation, tool: str
    ) -> Iterator[Move]:
        if tool == "cancel_reservation":
            yield from self._cancellations(r)
        elif tool == "update_reservation_flights":
            yield from self._cabin_changes(user, r)
            yield from self._swaps(user, r)
        elif tool == "update_reservation_baggages":
            yield from self._bags(user, r)
        elif tool == "update_reservation_passengers":
            yield from self._passenger_changes(user, r)

    def _flown(self, r: GroundedReservation) -> bool:
        """Whether any segment has taken off (or is not in the future at all)."""
        return any(
            s.date <= TODAY or self.day(s.flight_number, s.date)["status"] in FLOWN
            for s in r.segments
        )

    def _cancellations(self, r: GroundedReservation) -> Iterator[Move]:
        if r.cabin == "business":
            why = "You changed your plans (it is a business reservation)."
        elif r.created_at > YESTERDAY_NOW:
            why = "You changed your plans; you booked it less than 24 hours ago."
        elif r.insurance == "yes":
            why = "You cannot fly for health reasons, and you bought travel insurance."
        else:
            return
        request = f"You want to cancel reservation {r.reservation_id} ({_trip(r)}). {why}"
        yield Move(
            tool="cancel_reservation", kind="cancel", reservation_id=r.reservation_id,
            arguments={"reservation_id": r.reservation_id}, request=request,
        )  # fmt: skip

    def _cabin_changes(self, user: GroundedUser, r: GroundedReservation) -> Iterator[Move]:
        """The same flights in another cabin, where every flight has the seats."""
        n = len(r.passengers)
        for cabin in CABINS:
            prices = [self.bookable(s.flight_number, s.date, cabin, n) for s in r.segments]
            if cabin == r.cabin or any(p is None for p in prices):
                continue
            difference = (sum(p or 0 for p in prices) - sum(s.price for s in r.segments)) * n
            payers = _change_payers(user, difference)
            if payers:
                request = (
                    f"You want to move reservation {r.reservation_id} ({_trip(r)}) to "
                    f"{cabin.replace('_', ' ')}, same flights (difference ${difference})."
                )
                yield self._flights_move(r, cabin, _legs(r.segments), payers, "cabin", request)

    def _swaps(self, user: GroundedUser, r: GroundedReservation) -> Iterator[Move]:
        """One segment replaced by another flight on the same route and day."""
        if r.cabin == "basic_economy":
            return
        n = len(r.passengers)
        for k, s in enumerate(r.segments):
            for number in self.routes[(s.origin, s.destination)]:
                price = self.bookable(number, s.date, r.cabin, n)
                if number == s.flight_number or price is None or not self._connects(r, k, number):
                    continue
                payers = _change_payers(user, (price - s.price) * n)
                if not payers:
                    continue
                legs = _legs(r.segments)
                legs[k] = {"flight_number": number, "date": s.date}
                request = (
                    f"In reservation {r.reservation_id} ({_trip(r)}) you want flight "
                    f"{s.flight_number} on {s.date} replaced by {number} (${price} a seat)."
                )
                yield self._flights_move(r, r.cabin, legs, payers, "swap", request)

    def _connects(self, r: GroundedReservation, k: int, number: str) -> bool:
        """Whether flight `number` in place of segment k keeps same-day connections."""
        new = self.flights[number]
        before = r.segments[k - 1] if k > 0 else None
        after = r.segments[k + 1] if k + 1 < len(r.segments) else None
        ok = True
        if before is not None and before.date == r.segments[k].date:
            arrival = self.flights[before.flight_number]["scheduled_arrival_time_est"]
            ok &= "+1" not in arrival and arrival < new["scheduled_departure_time_est"]
        if after is not None and after.date == r.segments[k].date:
            departure = self.flights[after.flight_number]["scheduled_departure_time_est"]
            arrival = new["scheduled_arrival_time_est"]
            ok &= "+1" not in arrival and arrival < departure
        return ok

    @staticmethod
    def _flights_move(
        r: GroundedReservation, cabin: str, legs: list[JSON], payers: list[str], kind: str,
        request: str,
    ) -> Move:  # fmt: skip
        arguments = {
            "reservation_id": r.reservation_id, "cabin": cabin, "flights": legs,
            "payment_id": payers[0],
        }  # fmt: skip
        return Move(
            tool="update_reservation_flights", kind=kind, arguments=arguments, payers=payers,
            reservation_id=r.reservation_id, request=request,
        )  # fmt: skip

    def _bags(self, user: GroundedUser, r: GroundedReservation) -> Iterator[Move]:
        """One or two more checked bags, paid beyond the free allowance."""
        free = FREE_BAGS[user.membership][r.cabin] * len(r.passengers)
        for more in (1, 2):
            total = r.total_baggages + more
            nonfree = max(r.nonfree_baggages, total - free)
            payers = _change_payers(user, 50 * (nonfree - r.nonfree_baggages))
            if payers:
                arguments = {
                    "reservation_id": r.reservation_id, "total_baggages": total,
                    "nonfree_baggages": nonfree, "payment_id": payers[0],
                }  # fmt: skip
                request = (
                    f"You want {more} more checked bag{'s' if more > 1 else ''} on reservation "
                    f"{r.reservation_id} ({_trip(r)}): {total} in all, {nonfree} of them paid."
                )
                yield Move(
                    tool="update_reservation_baggages", kind="bags", arguments=arguments,
                    payers=payers, reservation_id=r.reservation_id, request=request,
                )  # fmt: skip

    def _passenger_changes(self, user: GroundedUser, r: GroundedReservation) -> Iterator[Move]:
        """A passenger replaced by one of the user's saved passengers (the count stays)."""
        for saved in user.saved_passengers:
            if saved in r.passengers:
                continue
            for k, old in enumerate(r.passengers):
                people = [p.model_dump() for p in r.passengers]
                people[k] = saved.model_dump()
                request = (
                    f"On reservation {r.reservation_id} ({_trip(r)}) you want passenger "
                    f"{old.first_name} {old.last_name} replaced by {saved.text()}."
                )
                yield Move(
                    tool="update_reservation_passengers", kind="passenger",
                    arguments={"reservation_id": r.reservation_id, "passengers": people},
                    reservation_id=r.reservation_id, request=request,
                )  # fmt: skip

    def _bookings(self, user: GroundedUser) -> Iterator[Move]:
        """One-way economy trips for the user alone, on routes they flew before."""
        me = self.users[user.user_id]
        traveller = {**me["name"], "dob": me["dob"]}
        routes = dict.fromkeys((self.reservations[r]["origin"], self.reservations[r]["destination"])
                               for r in user.reservations)  # fmt: skip
        offered = 0
        for origin, destination in routes:
            for date in BOOK_DATES:
                for number in self.routes[(origin, destination)]:
                    price = self.bookable(number, date, "economy", 1)
                    payers = [m.id for m in user.payment_methods if _covers(m, price or 0)]
                    if price is None or not payers or offered >= MAX_PER_RESERVATION:
                        continue
                    offered += 1
                    yield _booking(user.user_id, origin, destination, number, date, price,
                                   traveller, payers)  # fmt: skip

    def _certificates(self, user: GroundedUser) -> Iterator[Move]:
        """$100 per passenger for a reservation with a flight the airline cancelled."""
        for rid in user.reservations:
            r = self.reservation(rid)
            eligible = user.membership != "regular" or r.insurance == "yes" or r.cabin == "business"
            cancelled = [
                s for s in r.segments if self.day(s.flight_number, s.date)["status"] == "cancelled"
            ]
            if r.status == ACTIVE and eligible and cancelled:
                amount = 100 * len(r.passengers)
                request = (
                    f"You complain that the airline cancelled flight {cancelled[0].flight_number} "
                    f"on {cancelled[0].date} of reservation {rid}, and you ask for compensation."
                )
                yield Move(
                    tool="send_certificate", kind="certificate", reservation_id=rid,
                    arguments={"user_id": user.user_id, "amount": amount}, request=request,
                )  # fmt: skip
                return  # one certificate per user


def _booking(
    user_id: str, origin: str, destination: str, number: str, date: str, price: int,
    traveller: JSON, payers: list[str],
) -> Move:  # fmt: skip
    arguments = {
        "user_id": user_id, "origin": origin, "destination": destination,
        "flight_type": "one_way", "cabin": "economy",
        "flights": [{"flight_number": number, "date": date}], "passengers": [traveller],
        "payment_methods": [{"payment_id": payers[0], "amount": price}],
        "total_baggages": 0, "nonfree_baggages": 0, "insurance": "no",
    }  # fmt: skip
    request = (
        f"You want to book a one-way economy flight {origin}->{destination} on {date} "
        f"(flight {number}, ${price}) for yourself only, no bags, no insurance."
    )
    return Move(
        tool="book_reservation", kind="book", arguments=arguments, payers=payers, request=request
    )


def _covers(method: PaymentMethod, amount: int | float) -> bool:
    return method.balance is None or method.balance >= amount


def _change_payers(user: GroundedUser, amount: int) -> list[str]:
    """Methods a change may charge (or refund): never a certificate; a gift card that covers."""
    return [m.id for m in user.payment_methods if m.source != "certificate" and _covers(m, amount)]


def _legs(segments: list[Segment]) -> list[JSON]:
    return [{"flight_number": s.flight_number, "date": s.date} for s in segments]


def _trip(r: GroundedReservation) -> str:
    return f"{r.origin} to {r.destination} on {r.segments[0].date}" if r.segments else r.origin
