"""The tiny, regular language of the roleplay domain: topics, sentence templates, marker words.

Kept apart from the logic so the whole vocabulary can be read (and changed) in one place. Rules
the lists obey, because the reward detectors rely on them:

* every content sentence names at least two of its question's keywords (topic + two objects), so
  every pooled answer is fully relevant;
* every content sentence carries two marker words of its viewpoint and none of another's;
* marker words of one trait never appear in another trait's sentences.
"""

from __future__ import annotations

# topic: (object 1, object 2). Topics are single words; objects are plural or mass nouns.
TOPICS: dict[str, tuple[str, str]] = {
    "cooking": ("recipes", "spices"),
    "baking": ("bread", "cakes"),
    "running": ("shoes", "miles"),
    "swimming": ("laps", "strokes"),
    "cycling": ("bikes", "hills"),
    "hiking": ("trails", "boots"),
    "climbing": ("ropes", "holds"),
    "camping": ("tents", "fires"),
    "fishing": ("rods", "lakes"),
    "gardening": ("seeds", "plants"),
    "painting": ("brushes", "colors"),
    "drawing": ("pencils", "sketches"),
    "writing": ("stories", "drafts"),
    "reading": ("books", "chapters"),
    "singing": ("songs", "voices"),
    "dancing": ("moves", "rhythms"),
    "knitting": ("yarn", "needles"),
    "sewing": ("fabrics", "patterns"),
    "woodworking": ("saws", "boards"),
    "pottery": ("clay", "bowls"),
    "photography": ("cameras", "photos"),
    "chess": ("openings", "pieces"),
    "juggling": ("balls", "throws"),
    "skating": ("skates", "turns"),
    "surfing": ("waves", "surfboards"),
    "skiing": ("slopes", "poles"),
    "rowing": ("oars", "boats"),
    "boxing": ("gloves", "punches"),
    "yoga": ("poses", "mats"),
    "meditation": ("thoughts", "sessions"),
    "journaling": ("notebooks", "pages"),
    "budgeting": ("expenses", "savings"),
    "coding": ("programs", "bugs"),
    "guitar": ("chords", "strings"),
    "piano": ("keys", "scales"),
    "drums": ("beats", "sticks"),
    "violin": ("bows", "melodies"),
    "birdwatching": ("birds", "binoculars"),
    "astronomy": ("stars", "telescopes"),
    "sailing": ("sails", "winds"),
    "tennis": ("rackets", "serves"),
    "soccer": ("passes", "goals"),
    "basketball": ("shots", "dribbles"),
    "golf": ("clubs", "swings"),
    "archery": ("arrows", "targets"),
    "fencing": ("blades", "lunges"),
    "volunteering": ("shelters", "neighbors"),
    "parenting": ("children", "bedtimes"),
    "studying": ("notes", "exams"),
    "spanish": ("words", "verbs"),
    "french": ("phrases", "accents"),
    "origami": ("folds", "papers"),
    "calligraphy": ("letters", "inks"),
    "beekeeping": ("bees", "hives"),
    "composting": ("scraps", "worms"),
    "brewing": ("teas", "kettles"),
    "sculpting": ("stone", "chisels"),
    "embroidery": ("threads", "hoops"),
    "podcasting": ("episodes", "microphones"),
    "filmmaking": ("scenes", "scripts"),
    "acting": ("roles", "lines"),
    "poetry": ("poems", "rhymes"),
    "gaming": ("games", "controllers"),
    "crosswords": ("clues", "grids"),
    "magic": ("tricks", "cards"),
    "walking": ("paths", "parks"),
    "fitness": ("weights", "reps"),
    "stretching": ("muscles", "joints"),
    "nutrition": ("meals", "vegetables"),
    "sleep": ("pillows", "dreams"),
    "houseplants": ("pots", "leaves"),
    "aquariums": ("fish", "tanks"),
    "cleaning": ("rooms", "sponges"),
    "organizing": ("shelves", "boxes"),
    "investing": ("stocks", "funds"),
    "negotiating": ("offers", "deals"),
    "networking": ("contacts", "events"),
    "interviewing": ("resumes", "interviews"),
    "teaching": ("lessons", "students"),
    "mentoring": ("mentees", "talks"),
    "kayaking": ("paddles", "rivers"),
    "snowboarding": ("bindings", "jumps"),
    "bowling": ("pins", "lanes"),
    "badminton": ("shuttles", "nets"),
    "volleyball": ("spikes", "blocks"),
    "baseball": ("bats", "pitches"),
    "karate": ("kicks", "belts"),
    "skateboarding": ("ramps", "decks"),
    "blogging": ("posts", "readers"),
    "translating": ("texts", "dictionaries"),
    "math": ("proofs", "equations"),
    "robotics": ("robots", "sensors"),
    "electronics": ("circuits", "wires"),
    "quilting": ("quilts", "squares"),
    "jewelry": ("beads", "rings"),
    "makeup": ("lipsticks", "mirrors"),
    "traveling": ("maps", "luggage"),
    "foraging": ("mushrooms", "berries"),
    "pickling": ("jars", "cucumbers"),
    "grilling": ("grills", "steaks"),
    "puppetry": ("puppets", "stages"),
}

QUESTION_TEMPLATES = (
    "How can I get better at {topic}?",
    "What is a good way to start {topic}?",
    "Why do people enjoy {topic}?",
    "What should I know about {topic}?",
)

VIEWPOINTS = ("practical", "scientific", "emotional", "historical")

# Marker words per viewpoint: the detector counts them (two per content sentence).
VIEW_MARKERS: dict[str, frozenset[str]] = {
    "practical": frozenset(
        {"practice", "plan", "routine", "habit", "schedule", "daily", "checklist", "weekly"}
    ),
    "scientific": frozenset(
        {"research", "studies", "brain", "evidence", "data", "experiment", "science", "measure"}
    ),
    "emotional": frozenset({"feel", "joy", "calm", "proud", "heart", "love", "stress", "comfort"}),
    "historical": frozenset(
        {"history", "past", "ancient", "tradition", "centuries", "masters", "old", "ages"}
    ),
}

# {T} is the capitalised topic, {t} the topic, {a}/{b} its two objects.
CONTENT: dict[str, tuple[str, ...]] = {
    "practical": (
        "Practice {t} for ten minutes as a daily habit with your {a}.",
        "Make a simple plan and a weekly schedule for your {a} and {b}.",
        "Keep a short checklist for {t} and the same routine for your {b}.",
        "Set up a routine where you practice {t} with the same {a}.",
        "Write a plan for {t} and track your {b} in a daily log.",
        "Build a weekly habit of {t} and keep your {b} close.",
    ),
    "scientific": (
        "Research shows that {t} trains the brain as you work with {a}.",
        "Studies of {t} find clear evidence that regular work with {b} helps.",
        "Your brain learns {t} faster when you measure your {a} with simple data.",
        "Science explains {t} well, so run a small experiment with your {a}.",
        "Each experiment with {b} gives you data about how {t} works.",
        "Good evidence on {t} comes from studies that measure {b} over time.",
    ),
    "emotional": (
        "{T} can bring you joy and calm when you slow down with your {a}.",
        "Let yourself feel proud of every small moment with your {b} in {t}.",
        "{T} is a gentle way to lower stress and feel close to your {a}.",
        "Follow your heart in {t} and love the time with your {b}.",
        "Find comfort in {t} and feel the joy of working with {a}.",
        "Your {b} can turn {t} into a source of calm and comfort.",
    ),
    "historical": (
        "People have enjoyed {t} for centuries, and old {a} prove it.",
        "In the past, masters of {t} passed down their {b} as a tradition.",
        "The history of {t} is full of old {a} from ancient towns.",
        "Ancient teachers of {t} kept their {a} as a family tradition.",
        "Over the ages, {t} masters refined the use of {b}.",
        "The {b} of {t} carry a long history from the past.",
    ),
}

FIRST_PERSON_PREFIXES = ("I think ", "In my experience, ", "I believe ")
FIRST_PERSON_MARKERS = ("i think", "in my experience", "i believe", "i find", "i feel")

# Tone is one marker word in front of the first sentence (it costs no length).
CASUAL_OPENERS = ("Honestly, ", "Hey, ", "Totally, ")
FORMAL_OPENERS = ("Indeed, ", "Moreover, ", "Furthermore, ")
CASUAL_MARKERS = frozenset({"hey", "pretty", "stuff", "cool", "totally", "awesome", "honestly", "kinda"})
FORMAL_MARKERS = frozenset({"indeed", "therefore", "moreover", "thus", "furthermore", "merits", "methodical"})

EXAMPLES = (
    "For example, try one new kind of {a} every week.",
    "For example, a friend began with two {b} and grew fast.",
    "For example, start with the {a} you already have.",
)
EXAMPLE_MARKERS = ("for example", "for instance")

HUMOR = (
    "Even my cat laughs at my {a}, haha.",
    "My first {b} were so silly it became a running joke.",
    "My {a} look funny at first, and that is fine, haha.",
)
HUMOR_MARKERS = frozenset({"haha", "laugh", "laughs", "funny", "joke", "silly", "lol"})

CAVEATS = (
    "Be careful not to rush your {b}.",
    "Be careful with new {a} at the start.",
    "Watch out for worn {a}.",
)
CAVEAT_MARKERS = ("be careful", "watch out")

FOLLOW_UPS = (
    "What will you try first?",
    "How much time do you have?",
    "Which {a} will you try first?",
)
