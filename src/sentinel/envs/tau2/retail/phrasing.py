"""How retail's users ask for things and identify themselves (tau2 retail's scenarios write
facts plainly: "You are Yusuf Rossi in zip code 19122", "You do not remember your email")."""

import re

from sentinel.envs.pack import Kind, Phrasing

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
ZIP = re.compile(r"\b\d{5}\b")
PHONE = re.compile(r"(?:\+?1[\s.-]?)?\(?\d{3}\)?[\s.-]?\d{3}[\s.-]?\d{4}\b")

PHRASING = Phrasing(
    openings={
        "cancel_pending_order": "cancel an order I placed",
        "exchange_delivered_order_items": "exchange some items I received",
        "return_delivered_order_items": "return some items I received",
        "modify_pending_order_items": "change some items in an order that hasn't shipped yet",
        "modify_pending_order_address": "change the shipping address of a pending order",
        "modify_pending_order_payment": "change how I pay for a pending order",
        "modify_user_address": "update the address on my account",
    },
    default_opening="get some help with an order",
    question="Hi, I have a question about my orders and the products in your store.",
    ask_identity=(
        "No problem. Could you tell me your first and last name and zip code, or your user "
        "id, so I can locate your account?"
    ),
    user_id=re.compile(r"\b[a-z]+_[a-z]+_\d{4}\b"),
    kinds=(
        Kind(
            "email",
            re.compile(r"e-?mail", re.I),
            EMAIL,
            "Could you give me the email address on your account?",
        ),
        Kind(
            "order id",
            re.compile(r"order (?:id|number)", re.I),
            re.compile(r"#?\bW\d{7}\b"),
            "Could you tell me the order number?",
        ),
        Kind("zip code", re.compile(r"zip", re.I), ZIP, "Could you tell me your zip code?"),
        Kind(
            "phone number",
            re.compile(r"phone", re.I),
            PHONE,
            "Could you give me the phone number on your account?",
        ),
    ),
)
