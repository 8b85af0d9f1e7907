"""How airline's users ask for things and identify themselves: tau2 airline's scenarios say
"You are Emma Kim.\nYour user id is emma_kim_9957." and name reservations like "EHGLP3";
they never give an email, so email is the fallback kind (the last)."""

import re

from sentinel.envs.pack import Kind, Phrasing

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
USER_ID = re.compile(r"\b[a-z]+_[a-z]+_\d{3,5}\b")
RESERVATION_ID = re.compile(r"\b(?!HAT\d{3}\b)[A-Z0-9]{6}\b")  # not a flight number
DATE = re.compile(r"\b(?:\d{4}-\d{2}-\d{2}|(?:May|June) \d{1,2}(?:st|nd|rd|th)?)\b")

PHRASING = Phrasing(
    openings={
        "book_reservation": "book a flight",
        "cancel_reservation": "cancel a reservation",
        "update_reservation_flights": "change the flights of a reservation",
        "update_reservation_baggages": "add checked bags to a reservation",
        "update_reservation_passengers": "change a passenger on a reservation",
        "send_certificate": "get compensation for a cancelled flight",
    },
    default_opening="get some help with a reservation",
    question="Hi, I have a question about my reservations and your flights.",
    ask_identity="Sure. Could you tell me your user id, so I can locate your profile?",
    user_id=USER_ID,
    kinds=(
        Kind(
            "reservation id",
            re.compile(r"reservation (?:id|number)|confirmation", re.I),
            RESERVATION_ID,
            "Could you tell me the reservation id?",
        ),
        Kind(
            "flight date",
            re.compile(r"\bdate\b|\bday\b", re.I),
            DATE,
            "On which date is the flight?",
        ),
        Kind("user id", re.compile(r"user id", re.I), USER_ID, "Could you tell me your user id?"),
        Kind(
            "email",
            re.compile(r"e-?mail", re.I),
            EMAIL,
            "Could you give me the email address on your profile?",
        ),
    ),
)
