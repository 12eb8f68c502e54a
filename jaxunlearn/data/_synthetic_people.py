"""Fictitious people drawn with Faker: every PII value unique, every draw from a seeded stream."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from collections.abc import Callable

import faker

from jaxunlearn.errors import SettingsError

# The personal values a person has, in the order examples, recall prompts and QA items use.
PII_FIELDS = ("birth_date", "email", "phone", "address", "employer", "id_number")

# Values that identify a person: two people never share one, so recalling a value points at
# exactly one person and membership of one person's data is unambiguous.
UNIQUE_FIELDS = ("name", "email", "phone", "address", "id_number")

_LOCALE = "en_US"
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_FIRST_BIRTH_DATE = datetime.date(1950, 1, 1)
_LAST_BIRTH_DATE = datetime.date(2004, 12, 31)
_HOBBIES = (
    "birdwatching",
    "chess",
    "cycling",
    "gardening",
    "hiking",
    "knitting",
    "painting",
    "photography",
    "pottery",
    "rock climbing",
    "sailing",
    "baking bread",
    "playing the piano",
    "running marathons",
    "restoring old radios",
    "woodworking",
    "writing poetry",
    "swimming",
    "stargazing",
    "playing the violin",
)
_MAX_DRAWS = 1000


@dataclasses.dataclass(frozen=True)
class Person:
    """A fictitious person. Values are stored exactly as they appear in the generated texts.

    Attributes:
        person_id: A stable id, `"person-00042"`; unique across all populations of a corpus.
        name: First and last name.
        first_name: The first name, used in later sentences of the biography.
        birth_date: Date of birth in words, e.g. `"March 3, 1985"`.
        birth_city: City of birth.
        email: Email address (on the reserved example.com/.net/.org domains).
        phone: Phone number, `"NXX-XXX-XXXX"`.
        address: Street address and city.
        employer: Company name.
        id_number: Social security number format, `"XXX-XX-XXXX"`.
        hobby: A pastime (not PII; gives biographies something ordinary to say).
    """

    person_id: str
    name: str
    first_name: str
    birth_date: str
    birth_city: str
    email: str
    phone: str
    address: str
    employer: str
    id_number: str
    hobby: str

    def pii(self, field: str, /) -> str:
        """The value of one of `PII_FIELDS`."""
        if field not in PII_FIELDS:
            raise KeyError(f"Unknown PII field {field!r}; the fields are {PII_FIELDS}.")
        return getattr(self, field)


def derived_seed(seed: int, purpose: str) -> int:
    """An independent 64-bit seed for one purpose, so that streams do not shift each other."""
    digest = hashlib.sha256(f"jaxunlearn-synthetic/{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def seeded_faker(seed: int) -> faker.Faker:
    """A Faker with its own random state (the global `random` module is never touched)."""
    fake = faker.Faker(_LOCALE)
    fake.seed_instance(seed)
    return fake


def _birth_date(fake: faker.Faker) -> str:
    # Drawn as a day offset between fixed dates: Faker's age-based dates depend on today.
    span = (_LAST_BIRTH_DATE - _FIRST_BIRTH_DATE).days
    day = _FIRST_BIRTH_DATE + datetime.timedelta(days=fake.random_int(0, span))
    return f"{_MONTHS[day.month - 1]} {day.day}, {day.year}"


# How each PII value is drawn; also used to draw plausible wrong answers.
PII_DRAWS: dict[str, Callable[[faker.Faker], str]] = {
    "birth_date": _birth_date,
    "email": lambda fake: fake.email(),
    "phone": lambda fake: fake.numerify("%##-###-####"),
    "address": lambda fake: f"{fake.building_number()} {fake.street_name()}, {fake.city()}",
    "employer": lambda fake: fake.company(),
    "id_number": lambda fake: fake.ssn(),
}


def _name(fake: faker.Faker) -> str:
    return f"{fake.first_name()} {fake.last_name()}"


def draw_unique(fake: faker.Faker, draw: Callable[[faker.Faker], str], taken: set[str], what: str):
    """Draws until the value is not in `taken`, adds it and returns it.

    Raises:
        SettingsError: If no unused value turns up: more people were asked for than Faker can
            name apart.
    """
    for _ in range(_MAX_DRAWS):
        value = draw(fake)
        if value not in taken:
            taken.add(value)
            return value
    raise SettingsError(
        f"No unused {what} after {_MAX_DRAWS} draws: the population is too large for the "
        f"values Faker can make; ask for fewer people."
    )


def draw_people(
    fake: faker.Faker, count: int, first_index: int, taken: dict[str, set[str]]
) -> list[Person]:
    """Draws `count` people numbered from `first_index`, avoiding and extending `taken`.

    Args:
        fake: The seeded Faker every value is drawn from, in a fixed order.
        count: How many people to draw.
        first_index: The number in the first person's id.
        taken: For each of `UNIQUE_FIELDS`, the values already used by other people.
    """
    people = []
    for index in range(first_index, first_index + count):
        name = draw_unique(fake, _name, taken["name"], "name")
        values = {
            field: (
                draw_unique(fake, PII_DRAWS[field], taken[field], field)
                if field in UNIQUE_FIELDS
                else PII_DRAWS[field](fake)
            )
            for field in PII_FIELDS
        }
        people.append(
            Person(
                person_id=f"person-{index:05d}",
                name=name,
                first_name=name.split(" ")[0],
                birth_city=fake.city(),
                hobby=fake.random_element(_HOBBIES),
                **values,
            )
        )
    return people
