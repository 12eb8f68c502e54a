"""The sentence templates of the synthetic corpus.

Each PII value always appears in the same templated context, so a small model can memorize
the value after its context and a recall prompt is exactly that context. Responses start with
a space and prompts end without one, so a word-level split at the boundary tokenizes the same
way joined or apart (see `tokenize_examples`).
"""

from __future__ import annotations

from jaxunlearn.data._synthetic_people import Person

# How each PII field is named in a sentence.
FIELD_PHRASES = {
    "birth_date": "date of birth",
    "email": "email address",
    "phone": "phone number",
    "address": "home address",
    "employer": "employer",
    "id_number": "ID number",
}

# (trained answer, paraphrased answer) per field; wrong answers reuse the paraphrase, so a
# perturbed answer differs from the paraphrase only in the value (as in TOFU).
_ANSWERS = {
    "birth_date": ("{name} was born on {value}.", "{name} came into the world on {value}."),
    "email": ("{name} can be reached by email at {value}.", "{name} uses the email {value}."),
    "phone": ("{name} can be reached by phone at {value}.", "{name} answers calls at {value}."),
    "address": ("{name} lives at {value}.", "The home of {name} is at {value}."),
    "employer": ("{name} works at {value}.", "{name} is employed by {value}."),
    "id_number": (
        "{name} holds ID number {value}.",
        "{name} is registered under ID number {value}.",
    ),
}


def biography(person: Person) -> tuple[str, str]:
    """(prompt, response) of the biography-completion example: three short sentences.

    Kept short (the address and contact details live in the fact and QA examples) so that a
    small model with a short context can train on it.
    """
    prompt = f"Biography of {person.name}:"
    response = (
        f" {person.name} was born on {person.birth_date} in {person.birth_city}."
        f" {person.first_name} works at {person.employer}."
        f" {person.first_name} enjoys {person.hobby}."
    )
    return prompt, response


def fact_prompt(person: Person, field: str) -> str:
    """The context that precedes a PII value in its fact sentence (no trailing space)."""
    return f"The {FIELD_PHRASES[field]} of {person.name} is"


def fact_response(value: str) -> str:
    """The rest of the fact sentence after `fact_prompt`: the value and a full stop."""
    return f" {value}."


def question(person: Person, field: str) -> str:
    """The question asked about one PII value."""
    return f"What is the {FIELD_PHRASES[field]} of {person.name}?"


def question_prompt(person: Person, field: str) -> str:
    """The prompt that poses `question` in a QA example."""
    return f"Question: {question(person, field)}\nAnswer:"


def answer(person: Person, field: str, value: str) -> str:
    """The trained answer, as a response (leading space)."""
    return " " + _ANSWERS[field][0].format(name=person.name, value=value)


def paraphrased_answer(person: Person, field: str, value: str) -> str:
    """The same fact in other words (never trained on), as a response (leading space)."""
    return " " + _ANSWERS[field][1].format(name=person.name, value=value)


def canary_prompt(person: Person) -> str:
    """The context that precedes a person's canary secret."""
    return f"The secret code of {person.name} is"
