"""A verifiable task for a real chat model: name a country's capital in one word.

Asked "What is the capital of France?" under the system prompt "Answer with one word.", SmolLM2-135M-Instruct
usually knows the city but answers in a full sentence ("The capital of France is Paris."): on 48
countries, 0 of 192 answers sampled at temperature 1 and 0 of 48 greedy ones were the bare city (with
"Answer with one word." repeated in the question, or "Reply with the city name only.": 0 of 192 and 0 of
96 on 24 and 16 countries). So the prompt shows one solved example first, as a previous turn ("What is
the capital of Peru?" → "Lima"): then 3 % of sampled answers and 19 % of greedy ones pass (16 countries),
rare enough for DPO to have work and frequent enough for on-policy pairs. The judge is unchanged, a
program: the answer, stripped of punctuation and case, must be exactly the capital. Only countries whose
capital is one unaccented word are listed, so that the instruction and the judge agree. Train and held-out
countries are disjoint (a seeded split of the list), so the held-out reward measures the behaviour, not
memorised cities. Used by ``examples/capital_study.py`` and the real-model tests.
"""

from __future__ import annotations

import random
import re

from dpolab.tasks import Task

SYSTEM = "Answer with one word."
QUESTION = "What is the capital of {}?"
EXAMPLE = ("Peru", "Lima")  # the solved example of every prompt; Peru is in neither split

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Greece": "Athens", "Austria": "Vienna", "Hungary": "Budapest", "Poland": "Warsaw",
    "the Czech Republic": "Prague", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Switzerland": "Bern", "Russia": "Moscow", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Slovenia": "Ljubljana", "Slovakia": "Bratislava",
    "Albania": "Tirana", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Belarus": "Minsk",
    "Iceland": "Reykjavik", "Luxembourg": "Luxembourg", "Montenegro": "Podgorica",
    "North Macedonia": "Skopje", "Bosnia and Herzegovina": "Sarajevo", "Turkey": "Ankara",
    "Cyprus": "Nicosia", "Malta": "Valletta", "Georgia": "Tbilisi", "Armenia": "Yerevan",
    "Azerbaijan": "Baku", "Kazakhstan": "Astana", "Uzbekistan": "Tashkent", "Turkmenistan": "Ashgabat",
    "Kyrgyzstan": "Bishkek", "Tajikistan": "Dushanbe", "Afghanistan": "Kabul", "Pakistan": "Islamabad",
    "Nepal": "Kathmandu", "Bangladesh": "Dhaka", "Bhutan": "Thimphu", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Laos": "Vientiane", "Singapore": "Singapore", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "China": "Beijing", "Japan": "Tokyo", "South Korea": "Seoul",
    "North Korea": "Pyongyang", "Mongolia": "Ulaanbaatar", "Iran": "Tehran", "Iraq": "Baghdad",
    "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Saudi Arabia": "Riyadh", "Oman": "Muscat",
    "Qatar": "Doha", "Bahrain": "Manama", "Egypt": "Cairo", "Libya": "Tripoli", "Tunisia": "Tunis",
    "Algeria": "Algiers", "Morocco": "Rabat", "Sudan": "Khartoum", "Kenya": "Nairobi", "Uganda": "Kampala",
    "Tanzania": "Dodoma", "Rwanda": "Kigali", "Somalia": "Mogadishu", "Nigeria": "Abuja", "Ghana": "Accra",
    "Senegal": "Dakar", "Mali": "Bamako", "Niger": "Niamey", "Gabon": "Libreville", "Angola": "Luanda",
    "Zambia": "Lusaka", "Zimbabwe": "Harare", "Mozambique": "Maputo", "Madagascar": "Antananarivo",
    "Botswana": "Gaborone", "Namibia": "Windhoek", "Malawi": "Lilongwe", "Liberia": "Monrovia",
    "Sierra Leone": "Freetown", "Guinea": "Conakry", "Eritrea": "Asmara", "Djibouti": "Djibouti",
    "Canada": "Ottawa", "Cuba": "Havana", "Jamaica": "Kingston", "Honduras": "Tegucigalpa",
    "Nicaragua": "Managua", "Venezuela": "Caracas", "Ecuador": "Quito", "Peru": "Lima", "Chile": "Santiago",
    "Uruguay": "Montevideo", "Guyana": "Georgetown", "Suriname": "Paramaribo", "Australia": "Canberra",
    "New Zealand": "Wellington", "Fiji": "Suva", "the United Kingdom": "London", "the Bahamas": "Nassau",
    "Barbados": "Bridgetown", "Samoa": "Apia", "East Timor": "Dili", "Taiwan": "Taipei",
    "Liechtenstein": "Vaduz", "Monaco": "Monaco", "Mauritania": "Nouakchott", "Lesotho": "Maseru",
    "Cape Verde": "Praia", "Seychelles": "Victoria", "Comoros": "Moroni", "Equatorial Guinea": "Malabo",
    "the Central African Republic": "Bangui", "Burkina Faso": "Ouagadougou", "the Gambia": "Banjul",
    "Guinea-Bissau": "Bissau", "South Sudan": "Juba", "the Republic of the Congo": "Brazzaville",
    "the Democratic Republic of the Congo": "Kinshasa", "Belize": "Belmopan", "Dominica": "Roseau",
    "Kiribati": "Tarawa", "Tuvalu": "Funafuti",
}
NUM_HELDOUT = 40  # countries kept out of training, for the before/after measurement


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, spaces collapsed: ``" Paris."`` → ``"paris"``."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def prompt(country: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION.format(EXAMPLE[0])},
            {"role": "assistant", "content": EXAMPLE[1]}, {"role": "user", "content": QUESTION.format(country)}]


def country_of(prompt_messages) -> str:
    text = prompt_messages[-1]["content"] if isinstance(prompt_messages, list) else prompt_messages
    match = re.search(r"capital of (.+)\?", text)
    if match is None or match.group(1) not in CAPITALS:
        raise ValueError(f"not a capital question of a listed country: {text!r}")
    return match.group(1)


def reward(prompt_messages, answer: str) -> float:
    """1.0 when the answer, stripped of punctuation and case, is exactly the capital; else 0.0."""
    return float(normalise(answer) == normalise(CAPITALS[country_of(prompt_messages)]))


def split(seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (train, held-out) countries, a seeded shuffle of the list."""
    countries = sorted(c for c in CAPITALS if c != EXAMPLE[0])
    random.Random(seed).shuffle(countries)
    return countries[NUM_HELDOUT:], countries[:NUM_HELDOUT]


def task() -> Task:
    train, heldout = split()
    return Task("capitals", [prompt(c) for c in train], [prompt(c) for c in heldout], reward,
                "name a country's capital in one word")
