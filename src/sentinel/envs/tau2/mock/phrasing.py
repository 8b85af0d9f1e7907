"""How the mock domain's users ask for things and identify themselves.

tau2's mock scenarios name users and tasks by id ("Create a new task called 'Important
Meeting' for user_1", "Request that task_1 be marked as completed").
"""

import re

from sentinel.envs.pack import Kind, Phrasing

USER_ID = re.compile(r"\buser_\d+\b")
TASK_ID = re.compile(r"\btask_\d+\b")
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")

PHRASING = Phrasing(
    openings={
        "create_task": "add a new task to my to-do list",
        "update_task_status": "change the status of one of my tasks",
    },
    default_opening="get some help with my tasks",
    question="Hi, I have a question about my tasks.",
    ask_identity="Sure. Could you tell me your name or your user id, so I can find your tasks?",
    user_id=USER_ID,
    kinds=(
        Kind("task id", re.compile(r"task id", re.I), TASK_ID, "Which task is it? Its id, please?"),
        Kind("user id", re.compile(r"user id", re.I), USER_ID, "Could you tell me your user id?"),
        # The fallback: mock users have no email, so no scenario ever gives one.
        Kind("email", re.compile(r"e-?mail", re.I), EMAIL, "Could you give me your email?"),
    ),
)
