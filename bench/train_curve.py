"""The loss-curve comparison of our LoRA training with HF transformers + PEFT on a real model.

Both sides train the same LoRA adapter (all seven projections) from the same starting point on
the same batches with the same optimizer and schedule; the curves of the loss should agree up to
floating-point noise that grows slowly over the steps.

Subcommands:

  text     [--out bench/data/train_text.txt] [--seed 0]
           Writes the training text: English paragraphs made from templates by a seeded
           generator (towns, animals, recipes, weather, workshops, journeys, small stories,
           letters). The committed file is this command's output; `prepare` reads it (and makes
           it first if it is missing).

  prepare  --model HF_DIR --out DIR [--steps 300 --batch 4 --seq 256 --lr 5e-4
           --schedule cosine --warmup 20 --lora-r 16 --lora-alpha 32 --seed 0
           --weight-decay 0.0 --max-grad-norm 1.0] [--tokenizer TOK_DIR] [--text FILE] [--check]
           Tokenizes the text with HF_DIR's tokenizer (AutoTokenizer; or TOK_DIR's) and cuts it
           into steps * batch sequences of exactly `seq` tokens, each a contiguous window of the
           token stream taken in order (a window that would run past the end starts the stream
           again, shifted by a few tokens each pass). When the tokenizer puts a BOS in front of
           a text, every sequence starts with BOS followed by seq - 1 tokens of the stream.
           Labels are shifted already: label[i] = token[i + 1], -100 on the last row, and -100
           also on rows 0..7 of every 4th sequence (sequence index % 4 == 3), so that ignored
           labels are exercised. Writes
             DIR/batches.json   {"steps": [[{"tokens": [...], "labels": [...]}, x batch], x steps]}
             DIR/hparams.json   {"lr", "betas", "eps", "weight_decay", "max_grad_norm",
                                 "schedule", "warmup_steps", "total_steps", "lora_r",
                                 "lora_alpha", "seed"}
             DIR/adapter_init/  the PEFT LoRA adapter at its initialization (PEFT's default init:
                                A kaiming-uniform, seeded; B zero), written by save_pretrained
             DIR/prepare.json   what was used (model, tokenizer, text, counts), for the record.
           --check is a self-check of this script for a tokenizer whose ids exceed the model's
           vocabulary (a test fixture's tokenizer with another fixture's weights): ids are taken
           % vocab. Never use it for a real comparison.

  hf       --model HF_DIR --dir DIR [--device cuda] [--dtype float32|bfloat16] [--attn eager]
           The reference: the base model in --dtype (float32 by default: the stored weights
           widened, f32 math; TF32 off), DIR/adapter_init loaded with
           PeftModel.from_pretrained(is_trainable=True). Per step: each sequence run on its own
           (batch 1, position ids 0..T-1), CE(reduction="sum") over its labelled rows, the step's
           loss = sum over its sequences / labelled rows of the step; backward;
           clip_grad_norm_(max_grad_norm) (its return value, the norm before clipping, is
           recorded); torch.optim.AdamW(lr, betas, eps, weight_decay) step; the transformers
           schedule (get_cosine_schedule_with_warmup / get_linear_schedule_with_warmup /
           get_constant_schedule_with_warmup) stepped after the optimizer; zero_grad. Writes
           DIR/hf.json {"losses", "grad_norms", "lrs" (the lr each step used), "step_seconds",
           "backend"} and the trained adapter as DIR/hf_adapter/.

  compare  --dir DIR [--every 25] [--tol 0.03]
           Reads DIR/hf.json and DIR/ours.json (same keys), prints a markdown table (every
           `every` steps, the first and the last): the losses, their relative difference
           |ours - hf| / |hf|, the same for a trailing 10-step moving average of the loss, and
           the gradient norms; then the max and mean relative differences over all steps. Writes
           DIR/curve.md (the same text) and DIR/curve.svg (both curves, a hand-written SVG).
           Exit status 1 when a logged step's moving-average difference exceeds --tol, or when
           the runs differ in length.

A quick check without a GPU (tiny-chat has a tokenizer and weights):
  python bench/train_curve.py prepare --model tests/fixtures/hf/tiny-chat --out /tmp/c --steps 10 --batch 2 --seq 32
  python bench/train_curve.py hf --model tests/fixtures/hf/tiny-chat --dir /tmp/c --device cpu
  cp /tmp/c/hf.json /tmp/c/ours.json && python bench/train_curve.py compare --dir /tmp/c --every 5
"""
import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames; noise here

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXT = os.path.join(HERE, "data", "train_text.txt")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORED_PROMPT_ROWS = 8  # rows 0..7 of every 4th sequence are unlabelled
MOVING = 10  # window of the moving average in `compare`


# ----------------------------------------------------------------------------------------------
# The text: paragraphs from templates.

class Words:
    """Word lists and small helpers for the paragraph templates."""

    syllables_a = ["Bar", "Cal", "Dun", "El", "Fen", "Gar", "Hol", "Kes", "Lin", "Mar", "Nor", "Os",
                   "Pem", "Quen", "Ros", "Sel", "Tam", "Ul", "Ver", "Wick", "Yar", "Ash", "Brin",
                   "Cor", "Dal", "Hart", "Lam", "Mor", "Tre", "Whit"]
    syllables_b = ["ford", "ton", "bury", "wick", "mere", "dale", "haven", "stead", "field", "moor",
                   "brook", "cliff", "holm", "ley", "port", "thorpe", "wood", "gate", "by", "well"]
    first_names = ["Anna", "Ben", "Clara", "Daniel", "Elena", "Felix", "Grace", "Hugo", "Ida",
                   "James", "Kara", "Leo", "Maya", "Nathan", "Olga", "Peter", "Quinn", "Rosa",
                   "Samuel", "Tara", "Umar", "Vera", "Walter", "Yusuf", "Zoe", "Agnes", "Bruno",
                   "Celia", "Dmitri", "Esther", "Farid", "Greta", "Henrik", "Iris", "Jonas",
                   "Lena", "Marco", "Nina", "Oscar", "Priya", "Ruth", "Stefan", "Thea", "Victor"]
    jobs = ["baker", "carpenter", "teacher", "fisherman", "nurse", "potter", "librarian", "farmer",
            "blacksmith", "painter", "shepherd", "clockmaker", "gardener", "postman", "weaver",
            "beekeeper", "miller", "bookbinder", "ferryman", "cook", "glassblower", "tailor",
            "lighthouse keeper", "stonemason", "map maker", "violin maker", "cheese maker"]
    landscapes = ["at the mouth of a wide river", "on a hill above the sea", "in a narrow green valley",
                  "on the edge of a pine forest", "beside a quiet lake", "between two rocky ridges",
                  "on a flat plain of wheat fields", "at the foot of a tall mountain",
                  "on a small island reached by ferry", "where three old roads meet",
                  "along a slow canal", "in the shelter of a chalk cliff"]
    buildings = ["a stone church with a crooked tower", "a covered market hall", "a red brick mill",
                 "a narrow wooden bridge", "a small museum of local history", "an old railway station",
                 "a library with tall windows", "a white lighthouse", "a round watchtower",
                 "a theatre that seats three hundred people", "a public bath fed by warm springs",
                 "a school built around a courtyard"]
    goods = ["apples", "wool", "honey", "cheese", "pottery", "fresh fish", "bread", "timber",
             "linen", "salt", "plums", "leather shoes", "baskets", "copper pans", "cider",
             "walnuts", "candles", "rope", "pears", "smoked ham"]
    animals = [
        ("red fox", "mammal", "woodlands and farmland", "mice, rabbits, berries and insects", "at dusk"),
        ("barn owl", "bird", "open fields and old barns", "voles and shrews", "at night"),
        ("hedgehog", "mammal", "hedges, gardens and the edges of woods", "beetles, worms and slugs", "at night"),
        ("grey heron", "bird", "rivers, ponds and marshes", "fish and frogs", "in the early morning"),
        ("otter", "mammal", "clean rivers and rocky coasts", "fish, crabs and eels", "at dawn and dusk"),
        ("common toad", "amphibian", "damp woods and gardens", "insects, spiders and worms", "on wet evenings"),
        ("badger", "mammal", "woods with soft soil for digging", "earthworms, roots and fruit", "after dark"),
        ("kingfisher", "bird", "slow streams with steep banks", "small fish", "during the day"),
        ("red squirrel", "mammal", "pine forests", "seeds, nuts and fungi", "in the morning"),
        ("brown hare", "mammal", "open grassland", "grasses and herbs", "in the evening"),
        ("swift", "bird", "towns and cliffs", "flying insects", "all day long"),
        ("grass snake", "reptile", "wetlands and meadows", "frogs, newts and fish", "on warm afternoons"),
        ("honey bee", "insect", "meadows, orchards and gardens", "nectar and pollen", "on sunny days"),
        ("puffin", "bird", "sea cliffs and grassy islands", "small fish such as sand eels", "in summer"),
        ("wild boar", "mammal", "broadleaf forests", "acorns, roots and small animals", "at night"),
        ("dormouse", "mammal", "hazel woods and thick hedges", "hazelnuts, flowers and insects", "at night"),
    ]
    sizes = ["small", "medium-sized", "shy", "quick", "patient", "clever", "quiet", "watchful"]
    colors = ["brown", "grey", "reddish", "pale", "speckled", "dark", "sandy", "silvery"]
    dishes = [
        ("a vegetable soup", ["two onions", "three carrots", "a handful of lentils", "a bay leaf", "a litre of stock"],
         "simmer", 35),
        ("an apple cake", ["four apples", "two eggs", "a cup of flour", "half a cup of sugar", "a little butter"],
         "bake", 45),
        ("a bean stew", ["a tin of white beans", "a tomato", "a clove of garlic", "some thyme", "a splash of olive oil"],
         "simmer", 25),
        ("flat bread", ["two cups of flour", "a pinch of salt", "a spoon of oil", "warm water"], "bake", 12),
        ("a potato salad", ["six small potatoes", "a red onion", "a spoon of mustard", "fresh parsley", "some vinegar"],
         "boil", 20),
        ("a rice pudding", ["a cup of rice", "a litre of milk", "a piece of cinnamon", "a little sugar"], "simmer", 40),
        ("a mushroom pie", ["a basket of mushrooms", "a leek", "a sheet of pastry", "a cup of cream"], "bake", 30),
        ("pancakes", ["a cup of flour", "a cup of milk", "one egg", "a pinch of salt"], "fry", 4),
        ("a fish soup", ["two fillets of white fish", "a fennel bulb", "a potato", "a glass of white wine"],
         "simmer", 20),
        ("oat biscuits", ["two cups of oats", "a cup of flour", "honey", "butter", "a pinch of salt"], "bake", 15),
    ]
    crafts = [
        ("a wooden stool", ["a plank of oak", "a saw", "a drill", "sandpaper", "wood glue", "a tin of oil"],
         ["cut the seat to size", "mark where the legs will go", "drill the holes at a slight angle",
          "glue the legs in place", "sand every edge until it is smooth", "rub in two coats of oil"]),
        ("a bird box", ["a board of pine", "a hand saw", "nails", "a hammer", "a drill"],
         ["cut the front, back, sides, base and roof", "drill an entrance hole the size of a coin",
          "nail the sides to the base", "fix the roof so that it overhangs the front",
          "hang the box high on a wall that faces away from the midday sun"]),
        ("a clay bowl", ["a lump of clay", "a bowl of water", "a wire", "a wooden rib", "a sponge"],
         ["knead the clay to push out the air", "centre it on the wheel", "open the middle with your thumbs",
          "pull the walls up slowly", "smooth the rim with the sponge", "let it dry for a week before firing"]),
        ("a woven basket", ["willow rods soaked overnight", "a sharp knife", "a bodkin", "a bucket of water"],
         ["cross six rods to make the base", "weave thin rods around them", "bend the stakes upward",
          "weave the sides row by row", "finish the rim with a rope border"]),
        ("a notebook", ["sheets of paper", "a needle", "linen thread", "a bone folder", "card for the cover"],
         ["fold the sheets in groups of four", "pierce holes along each fold", "sew the groups together",
          "glue the spine", "fix the card cover and press it under books overnight"]),
    ]
    weathers = ["clear and cold", "grey and damp", "bright with a light breeze", "warm and still",
                "wet and windy", "misty in the morning and sunny later", "stormy", "mild and cloudy",
                "hot and dry", "frosty under a blue sky"]
    seasons = ["spring", "summer", "autumn", "winter"]
    season_notes = {
        "spring": ["the first blossom opens on the cherry trees", "lambs appear in the fields",
                   "the days grow longer each week", "swallows return from the south"],
        "summer": ["the evenings stay light until late", "the hay is cut and stacked", "children swim in the river",
                   "bees crowd the lavender"],
        "autumn": ["the leaves turn yellow and red", "apples are picked and pressed", "geese fly over in long lines",
                   "the first fires are lit in the evenings"],
        "winter": ["the ponds freeze at the edges", "snow covers the hills", "the market sells roasted chestnuts",
                   "people walk quickly with their collars up"],
    }
    places = ["the harbour", "the old quarter", "the botanical garden", "the castle ruins", "the river path",
              "the hill fort", "the covered bridge", "the night market", "the cathedral square",
              "the fishing village", "the salt marshes", "the vineyards", "the waterfall", "the city walls"]
    transports = ["by train", "on foot", "by bicycle", "by bus", "by boat", "in a borrowed car"]
    feelings = ["pleased", "tired but happy", "surprised", "a little worried", "proud", "calm", "curious",
                "grateful", "restless", "hopeful"]
    objects = ["an old key", "a letter without a stamp", "a brass compass", "a painted box", "a faded map",
               "a pocket watch", "a blue scarf", "a jar of buttons", "a broken lantern", "a silver spoon"]
    numbers = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"]


def cap(s):
    return s[0].upper() + s[1:]


def join_list(items):
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def town_name(r):
    return r.choice(Words.syllables_a) + r.choice(Words.syllables_b)


def para_town(r):
    w = Words
    name = town_name(r)
    people = r.randrange(800, 40000, 100)
    goods = r.sample(w.goods, 3)
    b1, b2 = r.sample(w.buildings, 2)
    s = [f"The town of {name} lies {r.choice(w.landscapes)}.",
         r.choice([f"About {people:,} people live there, and many of their families have stayed for generations.",
                   f"It has around {people:,} residents, a number that doubles in the summer months.",
                   f"Its population is close to {people:,}, though the old register counted far fewer."]),
         f"The oldest building is {b1}, and not far from it stands {b2}.",
         r.choice([f"On market days the square fills with stalls selling {join_list(goods)}.",
                   f"The town is known for its {goods[0]}, but visitors also come for the {goods[1]} and {goods[2]}.",
                   f"Local traders once grew rich on {goods[0]}; today {goods[1]} and {goods[2]} matter more."]),
         r.choice(["The streets are narrow and steep, so most people walk rather than drive.",
                   "A bus runs to the nearest city twice an hour, except on Sundays.",
                   "In the evening the cafes put chairs outside and the square becomes lively.",
                   "Every August a festival of music fills the streets for a week.",
                   "A path along the water leads to a beach of smooth grey stones."])]
    if r.random() < 0.5:
        s.append(r.choice([f"The nearest neighbour, {town_name(r)}, is a short ride away {r.choice(w.transports)}.",
                           "Many visitors say it is the quietest place they have ever stayed.",
                           f"The winters are {r.choice(w.weathers)}, and the summers are {r.choice(w.weathers)}."]))
    return " ".join(s)


def para_animal(r):
    w = Words
    name, cls, habitat, food, when = r.choice(w.animals)
    s = [f"The {name} is a {r.choice(w.sizes)} {cls} that lives in {habitat}.",
         f"It feeds mainly on {food}, and it is most active {when}.",
         r.choice([f"Its coat or plumage is usually {r.choice(w.colors)}, which helps it hide from danger.",
                   f"Young ones stay close to their parents for the first {r.choice(w.numbers)} weeks.",
                   "It has sharp senses and notices the smallest movement nearby.",
                   "In many places its numbers have fallen because its habitat has shrunk."]),
         r.choice(["If you want to see one, move slowly and keep the wind in your face.",
                   "Farmers and gardeners often welcome it, because it keeps pests in check.",
                   "Scientists count them every year to see how the population is changing.",
                   "Old stories in the region give it a clever and sometimes cunning character.",
                   f"A healthy adult may live for {r.choice(w.numbers)} years in the wild."])]
    return " ".join(s)


def para_recipe(r):
    dish, items, method, minutes = r.choice(Words.dishes)
    minutes += r.choice([-5, 0, 0, 5, 10]) if minutes > 10 else 0
    verb = {"simmer": "Let it simmer gently", "bake": "Bake it in a hot oven", "boil": "Boil them",
            "fry": "Fry each one in a hot pan"}[method]
    s = [f"To make {dish}, you will need {join_list(items)}.",
         r.choice(["Start by washing and chopping everything into pieces of a similar size.",
                   "Begin by weighing the ingredients and setting them out on the table.",
                   "First warm the pan or the oven, so that it is ready when you need it."]),
         r.choice(["Mix the ingredients in a large bowl and taste as you go.",
                   "Add the ingredients one at a time and stir after each.",
                   "Combine everything slowly, without rushing, so that nothing sticks."]),
         f"{verb} for about {minutes} minutes, until everything is cooked through.",
         r.choice(["Serve it warm with a slice of bread.", "It keeps well for two days in a cool place.",
                   "A little fresh pepper on top makes it even better.",
                   "Children usually ask for a second helping.",
                   "It tastes best when shared with friends at a long table."])]
    return " ".join(s)


def para_craft(r):
    thing, tools, steps = r.choice(Words.crafts)
    k = r.randint(3, len(steps))
    chosen = steps[:k]
    order = ["First", "Next", "Then", "After that", "Finally"]
    s = [f"Making {thing} takes about an afternoon.", f"You will need {join_list(tools)}."]
    for i, st in enumerate(chosen):
        word = order[-1] if i == len(chosen) - 1 else order[min(i, len(order) - 2)]
        s.append(f"{word}, {st}.")
    s.append(r.choice(["Take your time; mistakes are easier to avoid than to fix.",
                       "The first attempt is rarely perfect, but the second is always better.",
                       "Keep the workspace tidy and the tools sharp.",
                       "When it is done, sign it with your initials underneath."]))
    return " ".join(s)


def para_weather(r):
    w = Words
    season = r.choice(w.seasons)
    day = r.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])
    lo = r.randint(-5, 15) + (8 if season == "summer" else 0) - (6 if season == "winter" else 0)
    hi = lo + r.randint(3, 12)
    notes = r.sample(w.season_notes[season], 2)
    s = [f"On {day} the weather will be {r.choice(w.weathers)}, with temperatures between {lo} and {hi} degrees.",
         r.choice(["Rain is likely in the afternoon, so an umbrella would be wise.",
                   "The wind will ease after midday and the evening should be calm.",
                   "There is a small chance of thunder in the hills.",
                   "Fog may linger in the valleys until late morning.",
                   "Clouds will break up later, leaving a starry night."]),
         f"It is {season} now: {notes[0]}, and {notes[1]}.",
         r.choice(["Farmers hope for a dry week to finish their work.",
                   "Walkers should take warm layers and plenty of water.",
                   "The ferry timetable may change if the sea is rough.",
                   "The forecast for the weekend is more settled."])]
    return " ".join(s)


def para_journey(r):
    w = Words
    name = r.choice(w.first_names)
    town = town_name(r)
    a, b = r.sample(w.places, 2)
    s = [f"Last {r.choice(w.seasons)}, {name} travelled to {town} {r.choice(w.transports)}.",
         f"The journey took {r.choice(w.numbers)} hours, and the weather was {r.choice(w.weathers)}.",
         f"On the first day {name} visited {a}, and on the second day {b}.",
         r.choice([f"A guide explained how the town had grown around {a}.",
                   "The best meal of the trip was a simple soup in a small cafe by the water.",
                   f"{name} bought {r.choice(w.goods)} at a stall and carried them home carefully.",
                   "Most evenings ended with a long walk and an early night."]),
         f"At the end of the week {name} felt {r.choice(w.feelings)} and promised to return."]
    return " ".join(s)


def para_story(r):
    w = Words
    name, other = r.sample(w.first_names, 2)
    job = r.choice(w.jobs)
    art = "an" if job[0] in "aeiou" else "a"
    obj = r.choice(w.objects)
    s = [f"{name} was {art} {job} who lived {r.choice(w.landscapes)}.",
         r.choice(["Every morning began the same way, with a cup of tea and a look at the sky.",
                   "The work was hard, but the days passed quickly and the evenings were quiet.",
                   "Neighbours often stopped by to ask for help or simply to talk."]),
         f"One day, while clearing out an old cupboard, {name} found {obj}.",
         r.choice([f"Nobody in the village knew where it had come from, not even {other}, who knew everything.",
                   f"{other}, who lived next door, said it had belonged to a traveller long ago.",
                   "It seemed ordinary at first, but it raised questions that would not go away."]),
         r.choice([f"After some weeks of asking around, {name} learned that it had a long history.",
                   f"In the end {name} gave it to the small museum, where it still sits in a glass case.",
                   f"{name} kept it on the windowsill, where it caught the light each afternoon.",
                   f"{name} and {other} spent the winter trying to solve the puzzle together."]),
         f"Looking back, {name} felt {r.choice(w.feelings)} about the whole affair."]
    return " ".join(s)


def para_letter(r):
    w = Words
    to, frm = r.sample(w.first_names, 2)
    s = [f"Dear {to},",
         r.choice(["thank you for your letter, which arrived on a rainy morning and made the day brighter.",
                   "I hope this finds you well and that the new house is starting to feel like home.",
                   "it has been too long since I last wrote, and I have plenty of news."]),
         f"Here the weather has been {r.choice(w.weathers)}, and the garden is {r.choice(['full of weeds', 'finally in flower', 'resting for the winter', 'giving more beans than we can eat'])}.",
         r.choice([f"Last week I went to {r.choice(w.places)} and thought of you the whole time.",
                   f"I have started learning to be a {r.choice(w.jobs)}, which is harder than it looks.",
                   f"The neighbours gave us a basket of {r.choice(w.goods)}, so we will not go hungry.",
                   "The children have grown so much that you would hardly recognise them."]),
         r.choice(["Please write soon and tell me everything.", "Come and visit when the days are longer.",
                   "Give my regards to everyone at home."]),
         f"With warm wishes, {frm}."]
    return " ".join(s)


PARAGRAPHS = [para_town, para_animal, para_recipe, para_craft, para_weather, para_journey, para_story,
              para_letter]


def make_text(seed=0, target_bytes=300_000):
    """English paragraphs from the templates above, drawn by a seeded generator."""
    r = random.Random(seed)
    out, size = [], 0
    while size < target_bytes:
        p = r.choice(PARAGRAPHS)(r)
        out.append(p)
        size += len(p) + 2
    return "\n\n".join(out) + "\n"


def cmd_text(a):
    text = make_text(a.seed)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(f"wrote {a.out}: {len(text):,} bytes, {text.count(chr(10) * 2) + 1} paragraphs")


# ----------------------------------------------------------------------------------------------
# prepare

def windows(stream, n, length, shift=7):
    """n contiguous windows of `length` ids of `stream`, in order; a window that would pass the
    end restarts at the beginning, shifted by `shift` more tokens each pass."""
    if len(stream) < length:
        raise SystemExit(f"the text has {len(stream)} tokens, fewer than one window of {length}")
    out, pos, passes = [], 0, 0
    while len(out) < n:
        if pos + length > len(stream):
            passes += 1
            pos = (passes * shift) % max(len(stream) - length + 1, 1)
        out.append(stream[pos:pos + length])
        pos += length
    return out


def tidy_adapter(adir):
    """Drops the README PEFT writes and sorts target_modules (PEFT keeps them in a set, whose order
    depends on the hash seed), so that a rerun writes the same files."""
    readme = os.path.join(adir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    path = os.path.join(adir, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def cmd_prepare(a):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text_path = a.text or DEFAULT_TEXT
    if not os.path.exists(text_path):
        os.makedirs(os.path.dirname(os.path.abspath(text_path)), exist_ok=True)
        with open(text_path, "w") as f:
            f.write(make_text(0))
    with open(text_path) as f:
        text = f.read()
    tok = AutoTokenizer.from_pretrained(a.tokenizer or a.model)
    stream = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    probe = tok("Hello world.")["input_ids"]
    bos = tok.bos_token_id
    adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    with open(os.path.join(a.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    if a.check:
        stream = [t % vocab for t in stream]
        bos = None if bos is None else bos % vocab
    elif max(stream) >= vocab:
        raise SystemExit(f"token id {max(stream)} is outside the model's vocabulary of {vocab}")
    n = a.steps * a.batch
    body = a.seq - 1 if adds_bos else a.seq
    seqs = [([bos] if adds_bos else []) + w for w in windows(stream, n, body)]
    steps, labelled = [], 0
    for s in range(a.steps):
        step = []
        for b in range(a.batch):
            k = s * a.batch + b
            tokens = seqs[k]
            labels = tokens[1:] + [-100]
            if k % 4 == 3:
                labels[:IGNORED_PROMPT_ROWS] = [-100] * IGNORED_PROMPT_ROWS
            labelled += sum(1 for x in labels if x != -100)
            step.append({"tokens": tokens, "labels": labels})
        steps.append(step)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "batches.json"), "w") as f:
        json.dump({"steps": steps}, f, separators=(",", ":"))
    hp = {"lr": a.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": a.weight_decay,
          "max_grad_norm": a.max_grad_norm, "schedule": a.schedule, "warmup_steps": a.warmup,
          "total_steps": a.steps, "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "seed": a.seed}
    with open(os.path.join(a.out, "hparams.json"), "w") as f:
        json.dump(hp, f, indent=2)

    from peft import LoraConfig, get_peft_model
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    torch.manual_seed(a.seed)
    lc = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, target_modules=TARGETS,
                    bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lc)
    adir = os.path.join(a.out, "adapter_init")
    if os.path.isdir(adir):
        shutil.rmtree(adir)
    model.save_pretrained(adir)
    tidy_adapter(adir)
    with open(text_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    info = {"model": a.model, "tokenizer": a.tokenizer or a.model, "text": text_path, "text_sha256": sha,
            "text_tokens": len(stream), "bos": bos if adds_bos else None, "batch": a.batch, "seq": a.seq,
            "steps": a.steps, "sequences": n, "labelled_rows": labelled,
            "text_passes": round(n * body / len(stream), 2), "check": a.check}
    with open(os.path.join(a.out, "prepare.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"prepared {a.out}: {a.steps} steps x {a.batch} sequences x {a.seq} tokens "
          f"({labelled:,} labelled rows) from {len(stream):,} tokens of text "
          f"({info['text_passes']} passes), BOS {'yes' if adds_bos else 'no'}; adapter r {a.lora_r}, "
          f"alpha {a.lora_alpha}")


# ----------------------------------------------------------------------------------------------
# hf

def scheduler_for(opt, hp):
    import transformers
    kind, warm, total = hp["schedule"], hp["warmup_steps"], hp["total_steps"]
    if kind == "cosine":
        return transformers.get_cosine_schedule_with_warmup(opt, warm, total)
    if kind == "linear":
        return transformers.get_linear_schedule_with_warmup(opt, warm, total)
    if kind == "constant":
        return transformers.get_constant_schedule_with_warmup(opt, warm)
    raise SystemExit(f"unknown schedule {kind!r}")


def cmd_hf(a):
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu")
    torch.set_float32_matmul_precision("highest")  # no TF32: plain f32 products
    with open(os.path.join(a.dir, "hparams.json")) as f:
        hp = json.load(f)
    with open(os.path.join(a.dir, "batches.json")) as f:
        steps = json.load(f)["steps"]
    dtype = getattr(torch, a.dtype)
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=a.attn).to(a.device)
    model = PeftModel.from_pretrained(base, os.path.join(a.dir, "adapter_init"), is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    sched = scheduler_for(opt, hp)
    max_norm = hp.get("max_grad_norm")
    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"hf: {len(steps)} steps, {sum(p.numel() for p in params):,} trainable values, {a.dtype} "
          f"{a.attn} on {dev_name}", file=sys.stderr)
    losses, norms, lrs, secs = [], [], [], []
    start = time.perf_counter()

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    for i, step in enumerate(steps):
        sync()
        t = time.perf_counter()
        n_lab = sum(sum(1 for x in s["labels"] if x != -100) for s in step)
        total = 0.0
        # Sequences of one length run as one [B, T] batch (no padding, so no mask: the same
        # products as one at a time); others one by one, their gradients summed.
        same = len({len(s["tokens"]) for s in step}) == 1
        for group in ([step] if same else [[s] for s in step]):
            ids = torch.tensor([s["tokens"] for s in group], device=a.device)
            labels = torch.tensor([s["labels"] for s in group], device=a.device).flatten()
            pos = torch.arange(ids.shape[1], device=a.device)[None].expand(ids.shape[0], -1)
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
            ce = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100, reduction="sum")
            (ce / n_lab).backward()
            total += ce.item()
        if max_norm is not None and max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sync()
        secs.append(time.perf_counter() - t)
        losses.append(total / n_lab)
        norms.append(float(norm))
        if i % 25 == 0 or i + 1 == len(steps):
            print(f"hf step {i + 1:>4}/{len(steps)}: loss {losses[-1]:.4f}, grad norm {norms[-1]:.3f}, "
                  f"lr {lrs[-1]:.2e}, {secs[-1] * 1e3:.0f} ms", file=sys.stderr)
        if a.max_seconds > 0 and time.perf_counter() - start > a.max_seconds and i + 1 < len(steps):
            print(f"hf: stopped after {i + 1} steps: --max-seconds {a.max_seconds} spent", file=sys.stderr)
            break
    out = {"losses": losses, "grad_norms": norms, "lrs": lrs, "step_seconds": secs,
           "backend": f"hf+peft {a.device} {a.dtype}"}
    with open(os.path.join(a.dir, "hf.json"), "w") as f:
        json.dump(out, f)
    model.save_pretrained(os.path.join(a.dir, "hf_adapter"))
    tidy_adapter(os.path.join(a.dir, "hf_adapter"))
    print(f"hf: wrote {os.path.join(a.dir, 'hf.json')} ({len(losses)} steps, "
          f"{sum(secs):.1f} s of steps)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# compare

def moving_average(xs, k=MOVING):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def svg_plot(series, title, width=900, height=480):
    """A line plot of [(label, colour, ys, stroke width, opacity)] over steps 1..n, as SVG text."""
    ml, mr, mt, mb = 70, 20, 40, 50
    n = max(len(s[2]) for s in series)
    ys = [y for s in series for y in s[2] if math.isfinite(y)]
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.04 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    pw, ph = width - ml - mr, height - mt - mb

    def px(i):
        return ml + (pw * (i - 1) / max(n - 1, 1))

    def py(y):
        return mt + ph * (1 - (y - lo) / (hi - lo))

    def nice_step(span, target):
        raw = span / target
        mag = 10 ** math.floor(math.log10(raw))
        for m in (1, 2, 2.5, 5, 10):
            if raw <= m * mag:
                return m * mag
        return 10 * mag

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>']
    ystep = nice_step(hi - lo, 6)
    y = math.ceil(lo / ystep) * ystep
    while y <= hi:
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{ml - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        y += ystep
    xstep = max(1, int(nice_step(max(n - 1, 1), 8)))
    ticks = [1] + list(range(xstep, n + 1, xstep))
    for x in ticks:
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{mt + ph}" y2="{mt + ph + 5}" stroke="black"/>')
        out.append(f'<text x="{px(x):.1f}" y="{mt + ph + 18}" text-anchor="middle">{x}</text>')
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 12}" text-anchor="middle">step</text>')
    out.append(f'<text x="16" y="{mt + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {mt + ph / 2})">loss</text>')
    for label, colour, vals, sw, op in series:
        pts = " ".join(f"{px(i + 1):.1f},{py(v):.1f}" for i, v in enumerate(vals) if math.isfinite(v))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="{sw}" '
                   f'stroke-opacity="{op}"/>')
    ly = mt + 14
    for label, colour, vals, sw, op in series:
        out.append(f'<line x1="{ml + pw - 230}" x2="{ml + pw - 200}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="{max(sw, 2)}" stroke-opacity="{op}"/>')
        out.append(f'<text x="{ml + pw - 192}" y="{ly + 4}">{label}</text>')
        ly += 18
    out.append("</svg>")
    return "\n".join(out) + "\n"


def adapter_difference(d):
    """The largest relative L2 difference between the final adapters of both sides, if both exist."""
    pa, pb = os.path.join(d, "hf_adapter", "adapter_model.safetensors"), \
        os.path.join(d, "ours_adapter", "adapter_model.safetensors")
    if not (os.path.exists(pa) and os.path.exists(pb)):
        return None
    try:
        from safetensors.numpy import load_file
        import numpy as np
        ha, oa = load_file(pa), load_file(pb)
    except Exception as e:  # informational only
        return f"could not read the adapters ({type(e).__name__}: {e})"
    worst, name, missing = 0.0, "every tensor", sorted(set(ha) ^ set(oa))
    for k in sorted(set(ha) & set(oa)):
        h, o = ha[k].astype("float64"), oa[k].astype("float64")
        if h.shape != o.shape:
            return f"{k}: shapes {h.shape} and {o.shape} differ"
        r = float(np.linalg.norm(o - h) / max(np.linalg.norm(h), 1e-30))
        if r > worst:
            worst, name = r, k
    s = f"final adapters: largest relative L2 difference {worst:.3e} ({name})"
    if missing:
        s += f"; keys in only one of them: {len(missing)} (e.g. {missing[0]})"
    return s


def cmd_compare(a):
    with open(os.path.join(a.dir, "hf.json")) as f:
        hf = json.load(f)
    with open(os.path.join(a.dir, "ours.json")) as f:
        ours = json.load(f)
    hl, ol = hf["losses"], ours["losses"]
    n = min(len(hl), len(ol))
    failed = []
    if len(hl) != len(ol):
        failed.append(f"the runs differ in length: HF {len(hl)} steps, ours {len(ol)}")
    if n == 0:
        raise SystemExit("no steps to compare")
    hl, ol = hl[:n], ol[:n]
    hm, om = moving_average(hl), moving_average(ol)
    d = [rel(o, h) for o, h in zip(ol, hl)]
    dm = [rel(o, h) for o, h in zip(om, hm)]
    hn, on = hf.get("grad_norms") or [], ours.get("grad_norms") or []
    hr, orr = hf.get("lrs") or [], ours.get("lrs") or []
    logged = [s for s in range(1, n + 1) if s == 1 or s % a.every == 0 or s == n]

    def g(xs, i, fmt="{:.3f}"):
        return fmt.format(xs[i]) if i < len(xs) and xs[i] is not None else "-"

    lines = [f"# Loss curve: {ours.get('backend', 'ours')} vs {hf.get('backend', 'hf')}", ""]
    hp_path = os.path.join(a.dir, "hparams.json")
    if os.path.exists(hp_path):
        with open(hp_path) as f:
            hp = json.load(f)
        lines += [f"LoRA r {hp.get('lora_r')}, alpha {hp.get('lora_alpha')}, lr {hp.get('lr')} "
                  f"({hp.get('schedule')}, warm-up {hp.get('warmup_steps')}), weight decay "
                  f"{hp.get('weight_decay')}, max grad norm {hp.get('max_grad_norm')}, {n} steps.", ""]
    prep_path = os.path.join(a.dir, "prepare.json")
    if os.path.exists(prep_path):
        with open(prep_path) as f:
            pr = json.load(f)
        lines += [f"Batches: {pr.get('batch')} sequences x {pr.get('seq')} tokens per step, "
                  f"{pr.get('labelled_rows'):,} labelled rows in all; text {pr.get('text_tokens'):,} tokens "
                  f"({pr.get('text_passes')} passes).", ""]
    lines += [f"Relative difference = |ours - HF| / HF; avg{MOVING} = trailing {MOVING}-step moving average "
              f"of the loss (tolerance {a.tol} on the logged steps).", "",
              f"| step | HF loss | our loss | rel diff | HF avg{MOVING} | our avg{MOVING} | rel diff avg{MOVING} "
              f"| HF grad norm | our grad norm | lr |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in logged:
        i = s - 1
        mark = " **over**" if dm[i] > a.tol else ""
        lines.append(f"| {s} | {hl[i]:.4f} | {ol[i]:.4f} | {d[i]:.2e} | {hm[i]:.4f} | {om[i]:.4f} | "
                     f"{dm[i]:.2e}{mark} | {g(hn, i)} | {g(on, i)} | {g(hr, i, '{:.2e}')} |")
        if dm[i] > a.tol:
            failed.append(f"step {s}: the moving averages differ by {dm[i]:.3e} > {a.tol}")
    lines += ["",
              f"- loss, all {n} steps: max relative difference {max(d):.3e} (step {d.index(max(d)) + 1}), "
              f"mean {sum(d) / n:.3e}",
              f"- {MOVING}-step moving average: max {max(dm):.3e} (step {dm.index(max(dm)) + 1}), "
              f"mean {sum(dm) / n:.3e}"]
    m = min(len(hn), len(on), n)
    if m:
        dn = [rel(on[i], hn[i]) for i in range(m)]
        lines.append(f"- gradient norm: max relative difference {max(dn):.3e} (step {dn.index(max(dn)) + 1}), "
                     f"mean {sum(dn) / m:.3e}")
    m = min(len(hr), len(orr), n)
    if m:
        dl = [abs(orr[i] - hr[i]) / max(abs(hr[i]), 1e-12) if hr[i] else abs(orr[i]) for i in range(m)]
        lines.append(f"- learning rate: max relative difference {max(dl):.3e}")
    hs, os_ = hf.get("step_seconds") or [], ours.get("step_seconds") or []
    if hs and os_:
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        lines.append(f"- median step time: HF {med(hs) * 1e3:.1f} ms, ours {med(os_) * 1e3:.1f} ms")
    ad = adapter_difference(a.dir)
    if ad:
        lines.append(f"- {ad}")
    lines.append("")
    lines.append("Result: " + ("**FAIL**: " + "; ".join(failed) if failed else
                               f"pass (every logged moving-average difference within {a.tol})"))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.dir, "curve.md"), "w") as f:
        f.write(text)
    svg = svg_plot([("HF + PEFT, per step", "#1f77b4", hl, 1, 0.35),
                    ("ours, per step", "#d62728", ol, 1, 0.35),
                    (f"HF + PEFT, avg{MOVING}", "#1f77b4", hm, 2.2, 1.0),
                    (f"ours, avg{MOVING}", "#d62728", om, 2.2, 1.0)],
                   f"LoRA training loss: {ours.get('backend', 'ours')} vs {hf.get('backend', 'hf')}")
    with open(os.path.join(a.dir, "curve.svg"), "w") as f:
        f.write(svg)
    print(text, end="")
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("text", help="write the training text")
    t.add_argument("--out", default=DEFAULT_TEXT)
    t.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("prepare", help="batches, hyper-parameters and the initial adapter")
    p.add_argument("--model", required=True, help="HF model folder (config, weights, tokenizer)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="tokenizer folder when the model folder has none")
    p.add_argument("--text", help=f"training text (default {os.path.relpath(DEFAULT_TEXT)})")
    p.add_argument("--check", action="store_true", help="script self-check only: ids taken %% vocab")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    h = sub.add_parser("hf", help="train with transformers + PEFT, write DIR/hf.json")
    h.add_argument("--model", required=True)
    h.add_argument("--dir", required=True)
    h.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if present")
    h.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    h.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    h.add_argument("--max-seconds", type=float, default=0.0, help="stop early once spent (0: never)")
    c = sub.add_parser("compare", help="compare DIR/hf.json with DIR/ours.json")
    c.add_argument("--dir", required=True)
    c.add_argument("--every", type=int, default=25)
    c.add_argument("--tol", type=float, default=0.03)
    a = ap.parse_args()
    if a.cmd == "text":
        cmd_text(a)
    elif a.cmd == "prepare":
        if a.lora_alpha == int(a.lora_alpha):
            a.lora_alpha = int(a.lora_alpha)
        cmd_prepare(a)
    elif a.cmd == "hf":
        if a.device is None:
            import torch
            a.device = "cuda" if torch.cuda.is_available() else "cpu"
        cmd_hf(a)
    else:
        sys.exit(cmd_compare(a))


if __name__ == "__main__":
    main()
