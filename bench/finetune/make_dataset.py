#!/usr/bin/env python3
"""The fine-tuning task of bench/finetune: "answer in one JSON object".

Behaviour taught: every assistant reply is exactly one line

    {"answer": "<short answer>", "topic": "<topic>"}

(json.dumps with its default separators: `", "` and `": "`, keys in this order, nothing before
or after), where <topic> is one of the six words in TOPICS and names the kind of question. The
answers are computed here (sums, letter counts) or taken from fixed fact tables (capitals,
opposites...), so they are right. SmolLM2-135M-Instruct answers such questions in prose ("The
capital of France is Paris."), so check.py's strict format check gives the base model ~0%.

Written (deterministic: a seeded random.Random, no other input; the same files on every run):
- train.jsonl: N_TRAIN lines {"messages": [{"role": "user"}, {"role": "assistant"}]}. No system
  turn: SmolLM2's template then writes its default system prompt, exactly as `anyllama chat -p`
  (without --system) and transformers' apply_chat_template do at inference.
- heldout.jsonl: N_HELDOUT lines with the same "messages" (user turn + the reference reply, so
  the file also works as `anyllama train --eval`) plus "prompt" (the user text), "topic" (the
  expected topic), "answer" (the reference answer) and "accept" (every answer counted correct).
  Held-out prompts use question wordings that no training line uses and entities (countries,
  words, things, number pairs) that no training line mentions, and a few question kinds that
  training never asks (square of a number, past tense, "how many vowels"...), with the topic
  still one of the six. No held-out prompt appears in training (asserted).

Usage: python3 bench/finetune/make_dataset.py [--out-dir DIR] [--seed S] [--n-train N]
(defaults: this script's folder, seed 20251207, 480 training lines).
"""

import argparse
import json
import os
import random

TOPICS = ["math", "geography", "language", "colors", "animals", "counting"]

# ---- fact tables (split between train and held-out below; held-out entities are listed
# explicitly so the split does not depend on the seed)

CAPITALS = {
    "France": ("Paris", "Europe"), "Germany": ("Berlin", "Europe"), "Italy": ("Rome", "Europe"),
    "Spain": ("Madrid", "Europe"), "Portugal": ("Lisbon", "Europe"),
    "Greece": ("Athens", "Europe"), "Poland": ("Warsaw", "Europe"),
    "Austria": ("Vienna", "Europe"), "Sweden": ("Stockholm", "Europe"),
    "Norway": ("Oslo", "Europe"), "Finland": ("Helsinki", "Europe"),
    "Denmark": ("Copenhagen", "Europe"), "Ireland": ("Dublin", "Europe"),
    "Hungary": ("Budapest", "Europe"), "Belgium": ("Brussels", "Europe"),
    "Netherlands": ("Amsterdam", "Europe"), "Czechia": ("Prague", "Europe"),
    "Russia": ("Moscow", "Europe"), "Ukraine": ("Kyiv", "Europe"),
    "Romania": ("Bucharest", "Europe"), "Switzerland": ("Bern", "Europe"),
    "Japan": ("Tokyo", "Asia"), "China": ("Beijing", "Asia"), "India": ("New Delhi", "Asia"),
    "Thailand": ("Bangkok", "Asia"), "Vietnam": ("Hanoi", "Asia"),
    "South Korea": ("Seoul", "Asia"), "Indonesia": ("Jakarta", "Asia"),
    "Philippines": ("Manila", "Asia"), "Pakistan": ("Islamabad", "Asia"),
    "Iran": ("Tehran", "Asia"), "Iraq": ("Baghdad", "Asia"),
    "Saudi Arabia": ("Riyadh", "Asia"), "Turkey": ("Ankara", "Asia"),
    "Egypt": ("Cairo", "Africa"), "Kenya": ("Nairobi", "Africa"),
    "Nigeria": ("Abuja", "Africa"), "Ghana": ("Accra", "Africa"),
    "Ethiopia": ("Addis Ababa", "Africa"), "Morocco": ("Rabat", "Africa"),
    "Senegal": ("Dakar", "Africa"), "Uganda": ("Kampala", "Africa"),
    "Canada": ("Ottawa", "North America"), "Mexico": ("Mexico City", "North America"),
    "United States": ("Washington", "North America"), "Cuba": ("Havana", "North America"),
    "Brazil": ("Brasilia", "South America"), "Argentina": ("Buenos Aires", "South America"),
    "Peru": ("Lima", "South America"), "Chile": ("Santiago", "South America"),
    "Colombia": ("Bogota", "South America"), "Venezuela": ("Caracas", "South America"),
    "Australia": ("Canberra", "Oceania"), "New Zealand": ("Wellington", "Oceania"),
}
HELDOUT_COUNTRIES = ["Portugal", "Norway", "Kenya", "Vietnam", "Argentina", "Austria", "Egypt",
                     "Canada"]

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "happy": "sad", "fast": "slow",
    "light": "dark", "old": "young", "tall": "short", "open": "closed", "wet": "dry",
    "early": "late", "hard": "soft", "full": "empty", "rich": "poor", "strong": "weak",
    "loud": "quiet", "near": "far", "clean": "dirty", "thick": "thin", "heavy": "light",
    "high": "low", "inside": "outside", "win": "lose", "push": "pull", "day": "night",
    "first": "last", "always": "never", "true": "false", "buy": "sell", "begin": "end",
    "love": "hate", "left": "right", "north": "south", "east": "west", "give": "take",
    "laugh": "cry", "friend": "enemy", "question": "answer", "sweet": "sour", "brave": "afraid",
    "wide": "narrow", "deep": "shallow", "cheap": "expensive", "awake": "asleep",
}
HELDOUT_OPPOSITES = ["wet", "rich", "loud", "deep", "awake", "push"]

PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
    "woman": "women", "goose": "geese", "person": "people", "cat": "cats", "dog": "dogs",
    "box": "boxes", "city": "cities", "leaf": "leaves", "knife": "knives", "wolf": "wolves",
    "baby": "babies", "bus": "buses", "fox": "foxes", "sheep": "sheep", "fish": "fish",
    "ox": "oxen", "church": "churches", "potato": "potatoes", "tomato": "tomatoes",
    "story": "stories", "half": "halves", "dish": "dishes", "wife": "wives", "key": "keys",
}
HELDOUT_PLURALS = ["goose", "wolf", "story", "ox"]

PAST_TENSE = {  # held-out only: a question kind training never asks
    "run": "ran", "eat": "ate", "swim": "swam", "write": "wrote", "go": "went", "see": "saw",
}
HELDOUT_PAST = ["swim", "write"]

COLORS = {
    "a banana": "yellow", "grass": "green", "snow": "white", "coal": "black",
    "a ripe tomato": "red", "a carrot": "orange", "the sky on a clear day": "blue",
    "milk": "white", "a lemon": "yellow", "a strawberry": "red", "an orange": "orange",
    "a crow": "black", "a polar bear": "white", "a lime": "green", "blood": "red",
    "chocolate": "brown", "a pumpkin": "orange", "a frog": "green", "the sun": "yellow",
    "an eggplant": "purple", "a flamingo": "pink", "tree bark": "brown", "a cucumber": "green",
    "charcoal": "black", "a fire truck": "red", "a cloud": "white", "the ocean": "blue",
    "a school bus": "yellow", "a blueberry": "blue", "a lion": "brown",
}
HELDOUT_COLORS = ["a lemon", "a flamingo", "a pumpkin", "a crow", "an eggplant"]

SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
    "lion": "roar", "snake": "hiss", "pig": "oink", "owl": "hoot", "horse": "neigh",
    "frog": "croak", "bee": "buzz", "mouse": "squeak", "rooster": "cock-a-doodle-doo",
    "donkey": "hee-haw", "wolf": "howl", "goat": "bleat", "crow": "caw",
}
HELDOUT_SOUNDS = ["duck", "owl", "pig", "bee"]

BABIES = {
    "dog": "puppy", "cat": "kitten", "cow": "calf", "sheep": "lamb", "horse": "foal",
    "frog": "tadpole", "goat": "kid", "duck": "duckling", "kangaroo": "joey", "bear": "cub",
    "lion": "cub", "deer": "fawn", "swan": "cygnet", "goose": "gosling", "pig": "piglet",
    "owl": "owlet", "eagle": "eaglet", "hen": "chick",
}
HELDOUT_BABIES = ["kangaroo", "horse", "swan"]

LEGS = {
    "spider": 8, "dog": 4, "chicken": 2, "ant": 6, "cat": 4, "horse": 4, "duck": 2,
    "beetle": 6, "octopus": 8, "cow": 4, "ostrich": 2, "bee": 6, "elephant": 4, "penguin": 2,
    "snake": 0, "fish": 0, "crab": 10, "butterfly": 6,
}
HELDOUT_LEGS = ["ant", "octopus", "penguin"]

WORDS = [  # for "how many letters" and sentence building
    "apple", "river", "mountain", "cat", "banana", "window", "garden", "school", "pencil",
    "orange", "computer", "table", "music", "planet", "rabbit", "yellow", "bridge", "coffee",
    "doctor", "forest", "guitar", "island", "jacket", "kitchen", "ladder", "market", "number",
    "ocean", "pepper", "quiet", "rocket", "summer", "ticket", "umbrella", "village", "winter",
    "zebra", "bottle", "candle", "dragon", "engine", "flower", "hammer", "lemon", "mirror",
    "needle", "pillow", "silver", "tiger", "violin", "wallet", "basket", "cloud", "dance",
]
HELDOUT_WORDS = ["elephant", "triangle", "sandwich", "keyboard", "butterfly", "tomorrow"]

SENTENCE_WORDS = ["the", "a", "big", "small", "red", "dog", "cat", "runs", "sleeps", "under",
                  "over", "tree", "house", "quickly", "happy", "bird", "sings", "every",
                  "morning", "blue", "car", "stops", "near", "river", "my", "friend", "reads",
                  "book", "at", "night"]

# ---- question wordings: training and held-out sets never share one

TRAIN_Q = {
    "add": ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.",
            "Calculate {a} + {b}.", "What do you get when you add {a} to {b}?",
            "How much is {a} plus {b}?"],
    "sub": ["What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}.",
            "Calculate {a} - {b}.", "How much is {a} take away {b}?"],
    "mul": ["What is {a} times {b}?", "What is {a} x {b}?", "Multiply {a} by {b}.",
            "Calculate {a} * {b}.", "What is the product of {a} and {b}?"],
    "capital": ["What is the capital of {c}?", "Name the capital city of {c}.",
                "Which city is the capital of {c}?", "What city is {c}'s capital?",
                "capital of {c}?"],
    "continent": ["Which continent is {c} in?", "On which continent is {c}?",
                  "What continent does {c} belong to?"],
    "opposite": ["What is the opposite of {w}?", "What is the opposite of \"{w}\"?",
                 "Give me the opposite of the word {w}.", "What word means the opposite of {w}?",
                 "Antonym of {w}?"],
    "plural": ["What is the plural of {w}?", "What is the plural form of \"{w}\"?",
               "How do you say more than one {w}?", "Plural of {w}?"],
    "color": ["What color is {t}?", "What colour is {t}?", "Which color is {t} usually?",
              "Tell me the color of {t}."],
    "sound": ["What sound does {ax} make?", "What noise does {ax} make?",
              "What does {ax} say?", "Which sound is made by {ax}?"],
    "baby": ["What is a baby {x} called?", "What do you call a young {x}?",
             "A baby {x} is called what?"],
    "legs": ["How many legs does {ax} have?", "How many legs has {ax} got?",
             "Number of legs of {ax}?"],
    "letters": ["How many letters are in the word \"{w}\"?", "How many letters does {w} have?",
                "Count the letters in {w}.", "How long is the word {w} in letters?"],
    "words": ["How many words are in the sentence \"{s}\"?", "Count the words in: {s}",
              "How many words does this sentence have: \"{s}\"?"],
}

HELDOUT_Q = {
    "add": ["If I have {a} apples and buy {b} more, how many apples do I have?",
            "Please tell me the sum of {a} and {b}."],
    "sub": ["I had {a} coins and spent {b}. How many are left?",
            "What remains when you take {b} away from {a}?"],
    "mul": ["Compute {a} multiplied by {b}, please."],
    "square": ["What is the square of {a}?"],
    "capital": ["I am flying to {c} next week. Which city is its capital?",
                "Tell me the name of the capital of {c}.",
                "do you know the capital of {c}"],
    "continent": ["In what part of the world, which continent, would I find {c}?",
                  "{c} is located on which continent?"],
    "opposite": ["Tell me a word that means the reverse of {w}.",
                 "Quick question: reverse the meaning of '{w}' with one word.",
                 "what's the antonym for {w}"],
    "plural": ["I saw one {w} yesterday and three today. Three what?",
               "Write the plural of the noun '{w}'."],
    "past": ["What is the past tense of the verb '{w}'?"],
    "color": ["Most of the time, what colour would you say {t} is?",
              "My kid asks what color {t} is. What should I say?",
              "Describe the usual color of {t} in one word."],
    "sound": ["When {ax} makes noise, what do we hear?"],
    "baby": ["Young {x}s have a special name. What is it?"],
    "legs": ["Count the legs on {ax}. How many?",
             "If you look at {ax}, how many legs do you see?"],
    "letters": ["The word '{w}' is spelled with how many letters?",
                "what is the length of the word {w}, in letters"],
    "vowels": ["How many vowels are in the word '{w}'?"],
    "words": ["Tell me the word count of this sentence: {s}"],
}


def article(noun):
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def reply(answer, topic):
    assert topic in TOPICS
    return json.dumps({"answer": answer, "topic": topic}, ensure_ascii=False)


def sentence(rng):
    n = rng.randint(3, 9)
    words = [rng.choice(SENTENCE_WORDS) for _ in range(n)]
    s = " ".join(words)
    return s[0].upper() + s[1:] + ".", n


def question(kind, rng, q, pick, used_pairs):
    """One (user text, answer, topic, accepted answers) of `kind`, worded by `q`; `pick(name)`
    gives an entity of the pool `name`, `used_pairs` keeps number questions apart."""
    if kind in ("add", "sub", "mul", "square"):
        while True:
            if kind == "add":
                a, b = rng.randint(1, 60), rng.randint(1, 40)
                ans = a + b
            elif kind == "sub":
                a = rng.randint(5, 90)
                b = rng.randint(1, a - 1)
                ans = a - b
            elif kind == "mul":
                a, b = rng.randint(2, 12), rng.randint(2, 12)
                ans = a * b
            else:
                a, b = rng.randint(2, 15), 0
                ans = a * a
            if (kind, a, b) not in used_pairs["block"]:
                break
        used_pairs["seen"].add((kind, a, b))
        if kind in ("add", "mul"):
            used_pairs["seen"].add((kind, b, a))
        return q.format(a=a, b=b), str(ans), "math", [str(ans)]
    if kind in ("capital", "continent"):
        c = pick("countries")
        capital, continent = CAPITALS[c]
        if kind == "capital":
            return q.format(c=c), capital, "geography", [capital]
        return q.format(c=c), continent, "geography", [continent]
    if kind == "opposite":
        w = pick("opposites")
        return q.format(w=w), OPPOSITES[w], "language", [OPPOSITES[w]]
    if kind == "plural":
        w = pick("plurals")
        return q.format(w=w), PLURALS[w], "language", [PLURALS[w]]
    if kind == "past":
        w = pick("past")
        return q.format(w=w), PAST_TENSE[w], "language", [PAST_TENSE[w]]
    if kind == "color":
        t = pick("colors")
        return q.format(t=t), COLORS[t], "colors", [COLORS[t]]
    if kind == "sound":
        x = pick("sounds")
        return q.format(x=x, ax=article(x)), SOUNDS[x], "animals", [SOUNDS[x]]
    if kind == "baby":
        x = pick("babies")
        return q.format(x=x), BABIES[x], "animals", [BABIES[x]]
    if kind == "legs":
        x = pick("legs")
        n = LEGS[x]
        return q.format(x=x, ax=article(x)), str(n), "animals", [str(n)]
    if kind == "letters":
        w = pick("words")
        return q.format(w=w), str(len(w)), "counting", [str(len(w))]
    if kind == "vowels":
        w = pick("words")
        n = sum(ch in "aeiou" for ch in w)
        return q.format(w=w), str(n), "counting", [str(n)]
    if kind == "words":
        s, n = sentence(rng)
        return q.format(s=s), str(n), "counting", [str(n)]
    raise ValueError(kind)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=here)
    ap.add_argument("--seed", type=int, default=20251207)
    ap.add_argument("--n-train", type=int, default=480)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    def others(table, held):
        return [k for k in table if k not in held]

    train_pools = {
        "countries": others(CAPITALS, HELDOUT_COUNTRIES),
        "opposites": others(OPPOSITES, HELDOUT_OPPOSITES),
        "plurals": others(PLURALS, HELDOUT_PLURALS),
        "colors": others(COLORS, HELDOUT_COLORS),
        "sounds": others(SOUNDS, HELDOUT_SOUNDS),
        "babies": others(BABIES, HELDOUT_BABIES),
        "legs": others(LEGS, HELDOUT_LEGS),
        "words": [w for w in WORDS if w not in HELDOUT_WORDS],
    }
    held_pools = {
        "countries": list(HELDOUT_COUNTRIES), "opposites": list(HELDOUT_OPPOSITES),
        "plurals": list(HELDOUT_PLURALS), "past": list(HELDOUT_PAST),
        "colors": list(HELDOUT_COLORS), "sounds": list(HELDOUT_SOUNDS),
        "babies": list(HELDOUT_BABIES), "legs": list(HELDOUT_LEGS),
        "words": list(HELDOUT_WORDS),
    }

    # Held-out first (each wording once, in the table's order: 28 prompts), so that their
    # number pairs can be kept out of training.
    cursor = {name: 0 for name in held_pools}
    for pool in held_pools.values():
        rng.shuffle(pool)

    def held_pick(name):  # every entity once before any repeats
        pool = held_pools[name]
        cursor[name] += 1
        return pool[(cursor[name] - 1) % len(pool)]

    pairs = {"block": set(), "seen": set()}
    heldout = []
    for kind, qs in HELDOUT_Q.items():
        for q in qs:
            text, ans, topic, accept = question(kind, rng, q, held_pick, pairs)
            heldout.append({"prompt": text, "topic": topic, "answer": ans, "accept": accept})
    pairs = {"block": set(pairs["seen"]), "seen": set()}

    # Training: kinds weighted so each topic gets a fair share (math has three kinds,
    # geography two...), wordings uniform within a kind; exact duplicates skipped.
    kinds = list(TRAIN_Q)
    weights = {"add": 2, "sub": 2, "mul": 2, "capital": 4, "continent": 2, "opposite": 3,
               "plural": 3, "color": 6, "sound": 2, "baby": 2, "legs": 2, "letters": 3,
               "words": 3}
    train, seen = [], set()
    held_prompts = {h["prompt"].lower() for h in heldout}
    while len(train) < args.n_train:
        kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        q = rng.choice(TRAIN_Q[kind])
        text, ans, topic, _ = question(kind, rng, q, lambda name: rng.choice(train_pools[name]), pairs)
        if text in seen:
            continue
        assert text.lower() not in held_prompts
        seen.add(text)
        train.append({"messages": [{"role": "user", "content": text},
                                   {"role": "assistant", "content": reply(ans, topic)}]})

    with open(os.path.join(args.out_dir, "train.jsonl"), "w") as f:
        for row in train:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(args.out_dir, "heldout.jsonl"), "w") as f:
        for h in heldout:
            row = {"messages": [{"role": "user", "content": h["prompt"]},
                                {"role": "assistant", "content": reply(h["answer"], h["topic"])}],
                   **h}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = {}
    for row in train:
        t = json.loads(row["messages"][1]["content"])["topic"]
        counts[t] = counts.get(t, 0) + 1
    print(f"train.jsonl: {len(train)} lines {counts}; heldout.jsonl: {len(heldout)} prompts")


if __name__ == "__main__":
    main()
