"""How telecom's users ask for things and identify themselves (tau2 telecom's scenarios: "You
are John Smith with phone number 555-123-2002. You are currently abroad in France."): by
the phone number of their line, by customer id, or by full name with date of birth."""

import re

from sentinel.envs.pack import Kind, Phrasing

PHONE = re.compile(r"\b\d{3}-\d{3}-\d{4}\b")
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")

PHRASING = Phrasing(
    openings={
        "suspend_line": "suspend one of my phone lines for a while",
        "resume_line": "get my suspended line working again",
        "enable_roaming": "turn on roaming for my line, I'm travelling abroad",
        "disable_roaming": "turn off roaming on my line",
        "refuel_data": "add some data to my line, I've used up my plan",
        "send_payment_request": "pay an overdue bill",
    },
    default_opening="get some help with my phone line",
    question="Hi, I have a question about my phone line and my plan.",
    ask_identity=(
        "Sure. Could you give me the phone number of your line, so I can locate your account?"
    ),
    user_id=re.compile(r"\bC\d{4}\b"),  # a customer id
    kinds=(
        Kind(
            "customer id",
            re.compile(r"customer (?:id|number)", re.I),
            re.compile(r"\bC\d{4}\b"),
            "Could you tell me your customer id?",
        ),
        Kind(
            "date of birth",
            re.compile(r"date of birth|born", re.I),
            DATE,
            "Could you tell me your full name and date of birth?",
        ),
        Kind(
            "phone number",
            re.compile(r"phone", re.I),
            PHONE,
            "Could you give me the phone number of your line?",
        ),
    ),
)
