"""The demonstration task: triage of support tickets for the fictional "Nimbus Cloud".

A customer writes a ticket; the model answers with one line of JSON holding a category, a priority
and a product (the rules are in shared/demo-task.md). This module holds the task's definition,
a seeded data generator and the scorer.

How tickets are made: each ticket starts as a structured `Intent` (category, product and the
facts that decide priority: production hit, data lost, no workaround, ...). Labels come from the
intent through `triage_labels`, which applies the written rules; the text is then rendered from
sentence templates that state exactly those facts. The generator only builds situations whose
labels the rules settle without doubt, e.g. billing and sign-in topics are never phrased as
how-to questions, and outages never come with a workaround.

Every template pool is cut in two: every fourth template is held out for the test split, so the
test measures phrasings the model never trained on; validation shares train's templates. The pools
that carry the labels have more phrasings for training only (`MORE_TRAIN_TEMPLATES`), so that
training teaches the concept behind a label, not a few sentences that state it.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import TuneforgeError
from tuneforge.fsio import atomic_file
from tuneforge.tasks.metrics import json_fields, parse_json_object

SYSTEM_PROMPT = (
    "You are the triage assistant for Nimbus Cloud. Read the customer's ticket and answer with "
    'JSON only: {"category": ..., "priority": ..., "product": ...}.'
)

CATEGORIES = ("billing", "outage", "access", "bug", "feature_request", "how_to")
PRIORITIES = ("urgent", "high", "medium", "low")
PRODUCTS = ("compute", "storage", "database", "network", "console")
# The answer's keys, in the order the answer writes them.
FIELDS = ("category", "priority", "product")
LABELS = {"category": CATEGORIES, "priority": PRIORITIES, "product": PRODUCTS}

SPLITS = ("train", "validation", "test")
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
# Every TEST_EVERY-th template of each pool (index % TEST_EVERY == TEST_EVERY - 1) is test-only.
TEST_EVERY = 4
MAX_SENTENCES = 5


@dataclass(frozen=True)
class Intent:
    """What a ticket is about and the facts that decide its priority."""

    category: str
    product: str
    production_affected: bool = False  # the outage hits production or the customer's own users
    data_lost: bool = False
    security_breach: bool = False  # leaked keys, someone else in the account
    blocked: bool = False  # no workaround: locked out, a broken feature needed now
    wrong_charge: bool = False  # double charge, charge after cancelling
    has_workaround: bool = False
    unexpected_amount: bool = False  # asks about an unexpected amount on a bill


def triage_priority(intent: Intent) -> str:
    """The priority rules of demo-task.md, in order: the first rule that matches wins."""
    if (
        (intent.category == "outage" and intent.production_affected)
        or intent.data_lost
        or intent.security_breach
    ):
        return "urgent"
    if intent.blocked or intent.category == "outage" or intent.wrong_charge:
        return "high"
    if intent.has_workaround or intent.unexpected_amount:
        return "medium"
    return "low"


def triage_labels(intent: Intent) -> dict[str, str]:
    """The three labels of a ticket, keys in answer order."""
    return {"category": intent.category, "priority": triage_priority(intent), "product": intent.product}


def format_answer(labels: dict[str, str]) -> str:
    """The answer the model must give: one line of JSON, keys in answer order, as in demo-task.md."""
    return json.dumps({field: labels[field] for field in FIELDS})


# ----------------------------------------------------------------------------------------------
# What tickets talk about, per product. These fill a template's {subject} slot and are shared by
# all splits: the held-out part of the test is the sentence patterns, not the product vocabulary.

# Things that can be down. Console things are the dashboard's own pages.
SERVICES = {
    "compute": (
        "our VM",
        "my instance",
        "the app server",
        "our GPU instance",
        "the autoscaling group",
        "our build server",
    ),
    "storage": (
        "our bucket",
        "object storage",
        "the backup bucket",
        "my storage volume",
        "our snapshot storage",
    ),
    "database": (
        "our Postgres database",
        "the MySQL instance",
        "my managed database",
        "the read replica",
        "our main DB",
    ),
    "network": (
        "our load balancer",
        "DNS for our domain",
        "the VPN",
        "the CDN",
        "our floating IP",
    ),
    "console": (
        "the dashboard",
        "the web console",
        "the Nimbus dashboard",
        "the account settings page",
        "the billing page",
    ),
}
# What a charge is for; a console ticket names no product, so its charge is for nothing named.
BILLED_FOR = {
    "compute": (" for our GPU instances", " for the VMs", " for my two servers", " for autoscaling"),
    "storage": (" for object storage", " for our backup volumes", " for the snapshots", " for the buckets"),
    "database": (" for the managed Postgres", " for our MySQL database", " for the read replicas", " for the database"),
    "network": (" for the load balancer", " for CDN traffic", " for our extra IP addresses", " for the VPN"),
    "console": ("",),
}
SECURITY_EVENTS = {
    "compute": (
        "someone else logged into our VM over SSH",
        "an SSH key we don't recognise was added to our instance",
        "a stranger is running processes on our server",
    ),
    "storage": (
        "our storage access key was pushed to a public GitHub repo",
        "someone is downloading from our bucket with a key we revoked",
        "the secret key for our buckets leaked in a public paste",
    ),
    "database": (
        "our database password was posted in a public chat",
        "there's a database user we never created and it's running queries",
        "the connection string for our Postgres leaked on a forum",
    ),
    "network": (
        "someone changed our DNS records and it wasn't us",
        "our VPN credentials leaked in a public paste",
        "an unknown token is editing our load balancer rules",
    ),
    "console": (
        "there's a user in our team we never invited",
        "someone logged into our account from another country and changed the password",
        "our API key leaked in a public repo",
        "I got a login alert from a device that isn't ours",
    ),
}
ACCESS_PROBLEMS = {
    "compute": (
        "my SSH key is rejected by the VM",
        "I lost the root password for my server",
        "the instance says 'Permission denied (publickey)' for my key",
    ),
    "storage": (
        "my access key gets AccessDenied on our own bucket",
        "the storage API says my credentials are invalid",
        "the new bucket key I created is refused",
    ),
    "database": (
        "the database says 'password authentication failed' for my user",
        "our DB admin user can't log in anymore",
        "I reset the database password and the new one is rejected",
    ),
    "network": (
        "the VPN rejects my login",
        "my VPN certificate is refused",
        "the DNS API says my token is unauthorized",
    ),
    "console": (
        "two-factor codes are always rejected",
        "the password reset email never arrives",
        "SSO login sends me back to the sign-in page",
        "I can't sign in to the dashboard",
        "my teammate lost permission to see our project",
    ),
}
# A feature that works wrongly while the service is up.
BUG_SYMPTOMS = {
    "compute": (
        "autoscaling adds instances but never removes them",
        "resizing a VM fails with 'internal error 500'",
        "the GPU instance only shows one of its two GPUs",
        "the reboot command returns success but the VM never restarts",
    ),
    "storage": (
        "uploads over 5 GB fail with a checksum error",
        "listing the bucket returns the same page of objects twice",
        "presigned URLs expire immediately",
        "volume snapshots get stuck at 99%",
    ),
    "database": (
        "queries that use an index return wrong results",
        "the schema migration tool fails with a syntax error on valid SQL",
        "the read replica reports a negative replication lag",
        "changing a database parameter gives 'invalid value' for a valid value",
    ),
    "network": (
        "the load balancer health check marks healthy backends as down",
        "new DNS records never show up",
        "firewall rules I add are ignored",
        "certificate renewal fails with an error",
    ),
    "console": (
        "the Save button in account settings does nothing",
        "the dashboard shows an error when I open the usage page",
        "the dashboard search finds nothing even for exact names",
        "the project switcher in the dashboard always jumps back to the first project",
    ),
}
# A bug that destroyed data. Network products hold no data, so they have none.
DATA_LOSS_SYMPTOMS = {
    "compute": (
        "resizing the VM wiped everything on its disk",
        "our instance came back from maintenance with an empty disk",
    ),
    "storage": (
        "objects we uploaded yesterday have vanished from the bucket",
        "a snapshot restore gave us an empty volume",
        "the lifecycle rule deleted objects that should have been kept",
    ),
    "database": (
        "rows we wrote this morning are missing after the failover",
        "the migration tool dropped a column with all its data",
        "a point-in-time restore lost the last two days of data",
    ),
    "console": (
        "deleting one project in the dashboard also deleted a second project",
        "the dashboard's 'clear alerts' button deleted all our alert rules",
    ),
}
COSMETIC_SYMPTOMS = {
    "compute": (
        "the instance list shows memory as 'GiBs' with a stray s",
        "the CPU graph for my VM draws its legend on top of the lines",
    ),
    "storage": (
        "the bucket overview has a typo, it says 'Obejct count'",
        "sizes in the volume list aren't aligned",
    ),
    "database": (
        "the database overview spells PostgreSQL as 'Postgre SQL'",
        "the query stats chart uses the same colour for two lines",
    ),
    "network": (
        "the DNS record table cuts off long names with no tooltip",
        "the load balancer page shows the wrong icon",
    ),
    "console": (
        "the dashboard footer still says 2019",
        "the Save button in account settings is misaligned",
        "the dashboard logo is blurry on my screen",
    ),
}
FEATURE_WISHES = {
    "compute": (
        "ARM-based instances",
        "instances with more than 8 GPUs",
        "Windows Server images",
        "hibernation for VMs",
    ),
    "storage": (
        "object versioning for buckets",
        "volumes bigger than 16 TB",
        "SFTP access to buckets",
        "cross-region replication of backups",
    ),
    "database": (
        "support for PostgreSQL 17",
        "read replicas in another region",
        "the pgvector extension",
        "automatic index suggestions",
    ),
    "network": (
        "IPv6 on load balancers",
        "wildcard certificates",
        "DNSSEC for our domains",
        "a VPN client for Linux",
    ),
    "console": (
        "a dark mode for the dashboard",
        "a mobile app for the dashboard",
        "saved filters in the dashboard",
        "a German version of the dashboard",
    ),
}
HOW_TO_TASKS = {
    "compute": (
        "resize a VM",
        "attach a GPU to an existing instance",
        "set up autoscaling on a schedule",
        "move an instance to another region",
    ),
    "storage": (
        "make a bucket public-read",
        "restore a volume from a snapshot",
        "set a lifecycle rule that deletes old files",
        "schedule nightly backups of a volume",
    ),
    "database": (
        "add a read replica",
        "upgrade Postgres from 15 to 16",
        "import a MySQL dump",
        "find my slowest queries",
    ),
    "network": (
        "point my domain at a load balancer",
        "add a TXT record to my DNS zone",
        "open port 443 in the firewall",
        "put the CDN in front of my site",
    ),
    "console": (
        "switch the dashboard to dark mode",
        "create a new project",
        "pin a chart to my dashboard",
        "rename my project",
    ),
}
SINCE = ("this morning", "10:40 UTC", "midnight", "9am", "lunchtime", "yesterday evening")

# ----------------------------------------------------------------------------------------------
# Sentence templates. Slots: {subject} / {Subject} (capitalised), {since}, {other} / {Other}
# (another product's service, said to be fine). Each pool is cut into train and test templates.

TEMPLATES: dict[str, tuple[str, ...]] = {
    # core sentences, one per ticket
    "outage": (
        "{Subject} is down.",
        "{Subject} has been unreachable since {since}.",
        "We can't reach {subject} at all.",
        "Is {subject} down? Nothing loads.",
        "Every request to {subject} times out.",
        "{Subject} is so slow it's useless, every request takes minutes.",
        "{Subject} went dark and hasn't come back since {since}.",
        "Hello?? {Subject} is completely offline.",
        "{Subject} keeps answering 503 to everything.",
        "Connections to {subject} just hang since {since}.",
        "{Subject} is down again, second time this week.",
        "Nothing gets through to {subject} anymore, it's dead.",
    ),
    "wrong_charge": (
        "I was charged twice{subject} this month.",
        "You charged me{subject} after I cancelled.",
        "My card was billed two times for the same invoice{subject}.",
        "There are two identical payments{subject} on my statement.",
        "I cancelled last month but still got a charge{subject}.",
        "Double charge{subject} on my credit card, please refund one.",
        "Why was I billed{subject} after closing my plan?",
        "The same amount{subject} was taken from my account twice.",
        "We cancelled our subscription and you still billed us{subject}.",
        "Got charged two times{subject} on the 1st.",
        "My bank shows a duplicate charge{subject} from you.",
        "Our plan is cancelled, yet a new invoice{subject} was charged to our card.",
    ),
    "unexpected_amount": (
        "My bill{subject} is way higher than usual. Why?",
        "This month's invoice{subject} is three times last month's, what happened?",
        "Can you explain the amount{subject} on my latest bill? It looks too high.",
        "I expected about $40{subject} but the bill says $310. Where does that come from?",
        "Why did my costs{subject} jump this month?",
        "The invoice{subject} has a big line I don't understand. What is it?",
        "Our spend{subject} doubled overnight. Is that right?",
        "I don't get why I'm paying so much{subject} this month.",
        "The estimate said $20{subject} and the invoice says $95. Why the difference?",
        "Unexpected amount on my bill{subject}, can someone explain?",
        "How did my bill{subject} get this high?",
        "What are these extra charges{subject} on this month's invoice?",
    ),
    "billing_question": (
        "How much do you charge{subject}?",
        "Do your prices{subject} include VAT?",
        "Can I get my invoices{subject} in euros?",
        "Is there a discount{subject} if we pay yearly?",
        "Where can I find last year's invoices{subject}?",
        "What's the monthly price{subject}?",
        "Could you send me a copy of the March invoice{subject}?",
        "Is there a free tier{subject}?",
        "Can the invoices{subject} show our company's VAT number?",
        "Is pricing{subject} different in the EU region?",
        "Are you billing{subject} by the hour or by the month?",
        "Do you have volume pricing{subject} for bigger teams?",
    ),
    "breach": (
        "{Subject}.",
        "We just noticed {subject}!",
        "URGENT: {subject}.",
        "I think {subject}.",
        "Security problem: {subject}.",
        "It looks like {subject}.",
        "Please help, {subject}.",
        "This morning we found out {subject}.",
        "Our monitoring says {subject}.",
        "{Subject}, what do we do?",
        "Heads up: {subject}.",
        "We have reason to believe {subject}.",
    ),
    "access_problem": (
        "{Subject}.",
        "Since this morning {subject}.",
        "Help! {Subject}.",
        "For some reason {subject}.",
        "Since yesterday {subject}, no idea why.",
        "Login trouble: {subject}.",
        "I keep trying but {subject}.",
        "Can't get in: {subject}.",
        "After the weekend {subject}.",
        "Not sure what changed, but {subject}.",
        "{Subject} and I don't know why.",
        "Access problem here, {subject}.",
    ),
    "bug": (
        "{Subject}.",
        "Looks like a bug: {subject}.",
        "Not sure if it's just me, but {subject}.",
        "I think I found a bug, {subject}.",
        "Noticed today that {subject}.",
        "Bug report: {subject}.",
        "Something's off: {subject}.",
        "Since your last update, {subject}.",
        "FYI {subject}.",
        "Weird one: {subject}.",
        "{Subject}, is that expected?",
        "Can you look into this? {Subject}.",
    ),
    "feature": (
        "Please add {subject}.",
        "It would be great to have {subject}.",
        "Any plans for {subject}?",
        "We'd really like {subject}.",
        "Could you support {subject} in the future?",
        "Feature request: {subject}.",
        "Would love to see {subject} someday.",
        "Is {subject} on the roadmap? We'd use it right away.",
        "Suggestion: {subject} would save us a lot of time.",
        "You don't have {subject} yet, right? Please consider it.",
        "Adding {subject} would make Nimbus perfect for us.",
        "Our team keeps asking for {subject}.",
    ),
    "how_to": (
        "How do I {subject}?",
        "What's the way to {subject}?",
        "Can you tell me how to {subject}?",
        "I'd like to {subject}. Where do I start?",
        "Is there a guide on how to {subject}?",
        "Quick question: how can I {subject}?",
        "Trying to {subject} but I can't figure out the steps.",
        "What are the steps to {subject}?",
        "I want to {subject}, how is that done?",
        "Could someone explain how to {subject}?",
        "Need to {subject}. How?",
        "Where in Nimbus do I {subject}?",
    ),
    # facts that set the priority
    "production_hit": (
        "This is our production environment.",
        "Our customers can't place orders right now.",
        "All of our users are getting errors.",
        "Our users can't get past the login page of our app because of it.",
        "Our live site is down for every customer.",
        "Production is affected.",
        "Our app is down for all our users.",
        "Every customer of ours is hitting this.",
        "Our mobile app users see nothing but errors.",
        "It's taking down checkout for our real customers.",
        "It's our prod stack, everything customer-facing is broken.",
        "Our own customers are calling us about it.",
    ),
    "not_production": (
        "It's only our staging environment.",
        "This is just our test setup.",
        "It's the dev environment, nothing customer-facing.",
        "Only our staging copy uses it.",
    ),
    "blocked": (
        "There's no workaround, we're stuck.",
        "We need this working today and there's no way around it.",
        "I'm completely blocked.",
        "I can't do anything until this is fixed.",
        "Nothing we've tried gets around it.",
        "It blocks our whole team right now.",
        "We have no other way to do this.",
        "I'm stuck and can't continue.",
    ),
    "workaround": (
        "We found a workaround for now.",
        "I can get around it for the moment, but it's annoying.",
        "There's a clunky workaround, so we're managing.",
        "Doing it through the API instead works for now.",
        "Retrying a few times eventually works.",
        "We're working around it by hand.",
        "The CLI still does it correctly, so we use that.",
        "It's usable if we redo the step manually.",
    ),
    "locked_out": (
        "I'm completely locked out.",
        "There's no other way in for me.",
        "I'm locked out with no workaround.",
        "Nobody on the team can get in either.",
        "I've tried everything and I'm still locked out.",
        "We're stuck outside with no way in.",
        "I can't work at all until I get access back.",
        "No backup codes, no other admin, nothing.",
    ),
    "access_workaround": (
        "A recovery code got me in for now.",
        "A colleague's login still works, so we're managing.",
        "It works on the third or fourth try.",
        "Another machine of ours can still get in, so we can limp along.",
        "An old session still works, so I'm not stuck yet.",
        "Using a different browser works, oddly.",
        "I found a way in for now, but it's fragile.",
        "My teammate can still do it for me meanwhile.",
    ),
    "data_gone": (
        "That data is gone.",
        "We have no copy of what was lost.",
        "We can't get it back.",
        "This was real data and now it's lost.",
    ),
    "cosmetic_note": (
        "Just cosmetic.",
        "Minor thing, no rush.",
        "Not a big deal, it just looks wrong.",
        "Purely visual, everything works.",
    ),
    # asides: words of another category or product that must not move the labels
    "aside_outage": (
        "I can still sign in to my Nimbus account, so it's not a login issue.",
        "Our invoices are all paid, so it's not a billing hold.",
        "We didn't change any settings before it happened.",
        "Your status page says everything is fine, which is wrong.",
        "Nothing changed on our side.",
    ),
    "aside_billing": (
        "The service itself runs fine, this is only about money.",
        "I can log in and see the invoice, so access is fine.",
        "No technical problem at all.",
        "Our accountant flagged it.",
        "Our setup is the same as every month.",
    ),
    "aside_access": (
        "Our bill is paid, so it's not a suspension.",
        "The service itself seems to be up.",
        "I'm the account owner.",
        "I have the right email address on file.",
        "Nothing else seems wrong.",
    ),
    "aside_bug": (
        "Everything is up, just this part misbehaves.",
        "I'm logged in as an admin, so it's not permissions.",
        "Nothing else seems affected.",
        "I can reproduce it every time.",
        "Billing and everything else look normal.",
    ),
    "aside_feature_request": (
        "Nothing is broken, this is just a wish.",
        "We'd happily pay a bit more for it.",
        "Other providers have this.",
        "I searched the docs and it isn't there.",
        "No bug here, all good otherwise.",
    ),
    "aside_how_to": (
        "Nothing is broken, I just can't find the steps.",
        "The docs page on this confused me.",
        "I'm not a very technical person.",
        "Happy to read a guide if you have one.",
        "I'm new to Nimbus.",
    ),
    "other_product_fine": (
        "{Other} is fine, it's only this.",
        "{Other} still works normally.",
        "Just so you know, {other} is not affected.",
        "{Other} looks healthy, so it's not everything.",
    ),
    # tone and framing
    "greeting": (
        "Hi,",
        "Hello,",
        "Hey team,",
        "Good morning,",
        "Dear support,",
        "Hi there!",
        "Hello Nimbus team!",
        "Hey,",
    ),
    "closing": (
        "Thanks.",
        "Thank you!",
        "Cheers.",
        "Thanks in advance.",
        "Best regards.",
        "Kind regards, Sam.",
        "Thx.",
        "Appreciate it.",
    ),
    "polite": (
        "Could you please take a look?",
        "Any help is appreciated.",
        "Sorry to bother you with this.",
        "I'd be grateful for a quick answer.",
        "Thanks for your patience with me.",
        "Whenever you have a moment.",
        "Let me know if you need more details.",
        "Hope you're having a good day.",
    ),
    "angry": (
        "This is unacceptable.",
        "Fix it NOW.",
        "I'm getting really tired of this.",
        "Seriously?!",
        "What am I even paying for?",
        "Somebody answer me this time.",
        "Worst experience I've had with any provider.",
        "I want a real answer, not a canned reply.",
    ),
    "filler": (
        "We moved over to Nimbus last spring.",
        "I'm fairly new to all of this, sorry if this is obvious.",
        "Our team is just three people, so I handle everything.",
        "I already searched your docs for a while.",
        "I'm writing from my phone, sorry for typos.",
        "We've been happy with you otherwise.",
        "My manager asked me to raise this with you.",
        "I tried your chat first but nobody answered.",
        "Long story short, I need help.",
        "This is my first ticket here.",
        "We're a small design agency.",
        "I've read a few forum threads about this already.",
    ),
}

# More phrasings for the training split only, in the pools that carry a ticket's labels: the core
# sentence and the facts that set its priority, so that training sees a concept in more words than
# the nine (or six) phrasings above. None reuses a held-out template's wording, and the test split
# is drawn as before, byte for byte. With the quickstart's settings, three seeds scored 84/79/75%
# exact on the held-out tickets with these, against 72/76% (seeds 0/1) without; a second batch
# (eight more in each core pool, six in each fact pool) was no better: 82/69% on seeds 0/1 (issue
# notes, 2026-11-29).
MORE_TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "outage": (
        "{Subject} stopped responding around {since}.",
        "{Subject} won't come up at all.",
        "All calls to {subject} fail with connection refused.",
        "Outage? {Subject} doesn't respond to anything.",
        "{Subject} has been returning 502 errors for an hour.",
        "Nobody here can use {subject}, it just spins.",
        "{Subject} crashed around {since} and is still not back.",
        "It takes ten minutes to load anything from {subject}, it's unusable.",
        "We're seeing a full outage of {subject}.",
        "{Subject} vanished from the internet since {since}.",
        "Can't connect to {subject}, it's just gone.",
        "{Subject} is unavailable, every attempt errors out.",
    ),
    "wrong_charge": (
        "You billed me twice{subject} for the same month.",
        "I see the same charge{subject} two times on my card.",
        "My account was closed but you charged me again{subject}.",
        "Why do I have a second payment{subject} for one invoice?",
        "I was billed{subject} even though I cancelled weeks ago.",
        "Two payments went out{subject} when there should be one.",
        "After I cancelled, my card was still charged{subject}.",
        "The invoice{subject} was paid twice from our card.",
        "Please refund the second charge{subject}, I was billed double.",
        "We closed the account and you keep billing us{subject}.",
        "Charged again{subject} after cancelling, that's not right.",
        "My card got hit twice{subject} this month.",
    ),
    "unexpected_amount": (
        "Why is my invoice{subject} so high this month?",
        "The bill{subject} is much bigger than I thought it would be. Can you explain?",
        "I was surprised by the total{subject} on this invoice. What changed?",
        "Our costs{subject} went up a lot and we didn't change anything. Why?",
        "Can someone break down my invoice{subject}? The total seems high.",
        "The total on my bill{subject} is far above normal, what's in it?",
        "Our invoice{subject} grew a lot this month. What's the reason?",
        "Something on my bill{subject} looks too expensive. Can you check?",
        "I don't understand the amount{subject} on my latest invoice.",
        "The usage costs{subject} on this bill are much higher than normal.",
        "Why did we get such a big bill{subject}?",
        "Our monthly cost{subject} suddenly went up, can you tell me why?",
    ),
    "billing_question": (
        "What does it cost{subject}?",
        "Can I pay{subject} by bank transfer?",
        "How do you price{subject} in the Asia region?",
        "Can we get one invoice{subject} for all our projects?",
        "What currency do you bill{subject} in?",
        "Is the price{subject} the same in every region?",
        "Do you send invoices{subject} by email?",
        "How much would we pay{subject} for a team of ten?",
        "Where can I see your price list{subject}?",
        "Is tax included in the price{subject}?",
        "Do you bill{subject} in advance or at the end of the month?",
        "Which cards can I pay{subject} with?",
    ),
    "breach": (
        "Alarm: {subject}.",
        "We need help fast, {subject}.",
        "Security incident: {subject}.",
        "Just found that {subject}.",
        "{Subject}. Is our account compromised?",
        "Possible breach, {subject}.",
        "I'm worried because {subject}.",
        "Our logs show {subject}.",
        "One of our engineers spotted that {subject}.",
        "{Subject} and we're scared.",
        "Please lock things down, {subject}.",
        "Someone warned us that {subject}.",
    ),
    "access_problem": (
        "Ever since {since}, {subject}.",
        "Trouble signing in: {subject}.",
        "Every time I try, {subject}.",
        "{Subject}, please help.",
        "Problem: {subject}.",
        "Out of nowhere {subject}.",
        "I can't log in because {subject}.",
        "Today {subject}.",
        "Strange, {subject}.",
        "{Subject}. What can I do?",
        "Sign-in issue: {subject}.",
        "Since the weekend {subject}, it worked before.",
    ),
    "bug": (
        "Found a problem: {subject}.",
        "{Subject}, which seems broken.",
        "Reporting an issue, {subject}.",
        "It seems {subject}.",
        "Possible bug here: {subject}.",
        "Quick report: {subject}.",
        "Starting yesterday, {subject}.",
        "We noticed {subject}.",
        "Something is broken: {subject}.",
        "{Subject} and that can't be right.",
        "Odd behaviour: {subject}.",
        "Not working as it should: {subject}.",
    ),
    "feature": (
        "Do you plan to offer {subject}?",
        "Can you build {subject}?",
        "We'd pay for {subject}.",
        "Wish list: {subject}.",
        "I'd love {subject}.",
        "Have you thought about {subject}?",
        "Please consider {subject}.",
        "Missing feature: {subject}.",
        "Would it be possible to get {subject} one day?",
        "One thing we miss is {subject}.",
        "Idea for you: {subject}.",
        "We'd move more work to Nimbus if you had {subject}.",
    ),
    "how_to": (
        "How can we {subject}?",
        "Is it possible to {subject}, and how?",
        "Can you walk me through how to {subject}?",
        "I need help to {subject}.",
        "Any docs on how to {subject}?",
        "How would I {subject}?",
        "What's the best way to {subject}?",
        "Please explain how I can {subject}.",
        "How does one {subject} in Nimbus?",
        "I'm trying to figure out how to {subject}.",
        "Is there a tutorial to {subject}?",
        "Show me how to {subject}, please.",
    ),
    "production_hit": (
        "Our customers are affected.",
        "It's breaking our live website.",
        "Real users can't use our service.",
        "Our whole production stack depends on it.",
        "Our shop is losing sales every minute.",
        "This is hitting our paying users.",
        "Our production app is broken by it.",
        "Our SaaS is down for our clients.",
    ),
    "blocked": (
        "We can't work around it.",
        "This stops our release completely.",
        "There's nothing else we can do meanwhile.",
        "We're blocked until you fix it.",
        "No workaround exists, and we need it today.",
        "Our work is at a standstill.",
        "We've tried every way around it, none works.",
        "It's holding up everything we do.",
    ),
    "workaround": (
        "We can live with a workaround for now.",
        "Restarting the job makes it go away for a while.",
        "We have a temporary fix on our side.",
        "Doing it a second time usually works.",
        "There's a slower way that still works.",
        "An older version of our script gets around it.",
        "We're managing with a stopgap.",
        "It's annoying but we can work with it.",
    ),
    "locked_out": (
        "I have no way to get into my account.",
        "Everything I try fails, there's no way in.",
        "I'm shut out completely.",
        "I can't reach anything at all without access.",
        "There's no fallback login for me.",
        "I've lost all access and can't work.",
        "Without a way in, I'm stuck.",
        "No other login method works for me.",
    ),
    "access_workaround": (
        "The mobile app still lets me in for now.",
        "Logging in from another network works.",
        "Private browsing gets me in, strangely.",
        "The API token still works, so I'm managing.",
        "A backup admin account still works for now.",
        "It lets me in after clearing cookies.",
        "Another way in works meanwhile.",
        "The CLI login still works, so I get by.",
    ),
}


@dataclass(frozen=True)
class Scenario:
    """A kind of ticket: its intent facts, its core sentence pool, what fills the core sentence and
    which fact sentences it must (or may) carry."""

    name: str
    category: str
    core: str  # template pool of the core sentence
    subjects: dict[str, tuple[str, ...]]  # product -> fillers of {subject}; its keys are the products it can be about
    weight: int  # relative frequency, set so that no category or priority is rare
    facts: tuple[str, ...] = ()  # Intent flags set to True
    required: tuple[str, ...] = ()  # pools that state the facts: one sentence of each, always
    optional: tuple[str, ...] = ()  # pools of neutral context: one sentence of each, sometimes


def _only(table: dict[str, tuple[str, ...]], products: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {product: table[product] for product in products}


# A production hit needs a product the customer's own service runs on, so not the dashboard.
_HOSTING = ("compute", "storage", "database", "network")

SCENARIOS = (
    Scenario("outage_production", "outage", "outage", _only(SERVICES, _HOSTING), 3,
             facts=("production_affected",), required=("production_hit",), optional=("other_product_fine",)),
    Scenario("outage_unspecified", "outage", "outage", SERVICES, 2,
             optional=("not_production", "other_product_fine")),
    Scenario("billing_wrong_charge", "billing", "wrong_charge", BILLED_FOR, 2, facts=("wrong_charge",)),
    Scenario("billing_unexpected_amount", "billing", "unexpected_amount", BILLED_FOR, 2, facts=("unexpected_amount",)),
    Scenario("billing_question", "billing", "billing_question", BILLED_FOR, 1),
    Scenario("access_breach", "access", "breach", SECURITY_EVENTS, 2, facts=("security_breach",)),
    Scenario("access_locked_out", "access", "access_problem", ACCESS_PROBLEMS, 2,
             facts=("blocked",), required=("locked_out",)),
    Scenario("access_workaround", "access", "access_problem", ACCESS_PROBLEMS, 1,
             facts=("has_workaround",), required=("access_workaround",)),
    Scenario("bug_data_loss", "bug", "bug", DATA_LOSS_SYMPTOMS, 1, facts=("data_lost",), optional=("data_gone",)),
    Scenario("bug_blocking", "bug", "bug", BUG_SYMPTOMS, 1, facts=("blocked",), required=("blocked",)),
    Scenario("bug_workaround", "bug", "bug", BUG_SYMPTOMS, 2, facts=("has_workaround",), required=("workaround",)),
    Scenario("bug_cosmetic", "bug", "bug", COSMETIC_SYMPTOMS, 1, optional=("cosmetic_note",)),
    Scenario("feature_request", "feature_request", "feature", FEATURE_WISHES, 4),
    Scenario("how_to", "how_to", "how_to", HOW_TO_TASKS, 4),
)

# Tone: (weight, chance of a greeting, of a tone sentence, of an aside, of a closing, fillers).
TONES = {
    "plain": (5, 0.3, 0.0, 0.3, 0.4, 0),
    "polite": (4, 0.9, 0.8, 0.3, 0.9, 0),
    "angry": (4, 0.1, 0.9, 0.3, 0.2, 0),
    "terse": (4, 0.0, 0.0, 0.15, 0.0, 0),
    "rambling": (3, 0.7, 0.0, 0.6, 0.7, 2),
}
TYPO_CHANCE = 0.35
# How terse writers shorten words.
TERSE_WORDS = {
    "production": "prod", "database": "db", "please": "pls", "because": "bc", "you": "u",
    "can't": "cant", "don't": "dont", "i'm": "im", "it's": "its",
}
# Context that only makes sense for a service the customer runs, not for the dashboard.
_NOT_FOR_CONSOLE = ("not_production", "other_product_fine")


def template_split(index: int) -> str:
    """The split a template belongs to, by its index in its pool."""
    return "test" if index % TEST_EVERY == TEST_EVERY - 1 else "train"


@functools.cache
def split_templates(split: str) -> dict[str, list[tuple[str, str]]]:
    """Pool name -> [(template id, template)] usable by `split` (validation uses train's)."""
    source = "test" if split == "test" else "train"
    pools = {
        pool: [(f"{pool}:{i}", t) for i, t in enumerate(templates) if template_split(i) == source]
        for pool, templates in TEMPLATES.items()
    }
    if source == "train":
        for pool, templates in MORE_TRAIN_TEMPLATES.items():
            pools[pool] += [(f"{pool}:{len(TEMPLATES[pool]) + i}", t) for i, t in enumerate(templates)]
    return pools


@dataclass(frozen=True)
class Ticket:
    text: str
    intent: Intent
    labels: dict[str, str]
    templates: tuple[str, ...]  # ids ("pool:index") of the templates the text was rendered from
    tone: str
    sentences: int  # how many sentences, not counting a greeting


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_start(sentence: str) -> str:
    """Lower-case a sentence's first letter after a comma greeting, unless the word is 'I' or an
    acronym/name (which keep their capitals)."""
    first = sentence.split(" ", 1)[0]
    if first in ("I", "I'm", "I've", "I'd") or any(c.isupper() for c in first[1:]):
        return sentence
    return sentence[:1].lower() + sentence[1:]


def _sentence_count(piece: str) -> int:
    return max(1, len(re.findall(r"[.!?]+(?:\s|$)", piece)))


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:  # drop a letter
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]  # double a letter


def _add_typos(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    for i in rng.sample(candidates, min(len(candidates), rng.randint(1, 3))):
        words[i] = _typo(words[i], rng)
    return " ".join(words)


def _make_terse(text: str, rng: random.Random) -> str:
    text = text.lower()
    for long, short in TERSE_WORDS.items():
        text = re.sub(rf"\b{re.escape(long)}\b", short, text)
    text = re.sub(r"\bthe ", "", text)
    # Terse writers drop the last full stop and often run sentences together with a comma or dash.
    joint = rng.choice((". ", ", ", " - "))
    return re.sub(r"\.\s+", joint, text).removesuffix(".")


def _make_angry(pieces: list[str], rng: random.Random) -> list[str]:
    return [p[:-1] + rng.choice(("!", "!!", "!!!")) if p.endswith(".") and rng.random() < 0.6 else p for p in pieces]


def sample_ticket(rng: random.Random, split: str) -> Ticket:
    """Draw one ticket for `split`, rendered only from that split's templates."""
    pools = split_templates(split)
    scenario = rng.choices(SCENARIOS, weights=[s.weight for s in SCENARIOS])[0]
    product = rng.choice(list(scenario.subjects))
    intent = Intent(scenario.category, product, **{fact: True for fact in scenario.facts})
    subject = rng.choice(scenario.subjects[product])
    other = rng.choice([s for p in _HOSTING if p != product for s in SERVICES[p]])
    slots = {
        "subject": subject, "Subject": _capitalise(subject), "since": rng.choice(SINCE),
        "other": other, "Other": _capitalise(other),
    }

    def render(pool: str) -> tuple[str, str]:
        template_id, template = rng.choice(pools[pool])
        return template_id, template.format(**slots)

    tone = rng.choices(list(TONES), weights=[t[0] for t in TONES.values()])[0]
    _, p_greeting, p_tone_sentence, p_aside, p_closing, n_fillers = TONES[tone]

    # (template id, sentence) in the order a ticket reads: the facts always, extras up to the cap.
    pieces = [render(scenario.core)] + [render(pool) for pool in scenario.required]
    extras = [
        render(pool)
        for pool in scenario.optional
        if rng.random() < 0.4 and not (product == "console" and pool in _NOT_FOR_CONSOLE)
    ]
    if rng.random() < p_aside:
        extras.append(render(f"aside_{scenario.category}"))
    if tone in ("polite", "angry") and rng.random() < p_tone_sentence:
        extras.append(render(tone))
    if n_fillers:
        extras += rng.sample(pools["filler"], rng.randint(1, n_fillers))  # fillers have no slots
    rng.shuffle(extras)
    closing = [render("closing")] if rng.random() < p_closing else []
    sentences = sum(_sentence_count(text) for _, text in pieces)
    for piece in extras + closing:
        if sentences + _sentence_count(piece[1]) <= MAX_SENTENCES:
            pieces.append(piece)
            sentences += _sentence_count(piece[1])

    template_ids = [template_id for template_id, _ in pieces]
    texts = [text for _, text in pieces]
    if tone == "angry":
        texts = _make_angry(texts, rng)
    if rng.random() < p_greeting:
        greeting_id, greeting = render("greeting")
        template_ids.insert(0, greeting_id)
        texts[0] = f"{greeting} {_lower_start(texts[0]) if greeting.endswith(',') else texts[0]}"
    text = " ".join(texts)
    if tone == "terse":
        text = _make_terse(text, rng)
    if rng.random() < TYPO_CHANCE:
        text = _add_typos(text, rng)
    return Ticket(text, intent, triage_labels(intent), tuple(template_ids), tone, sentences)


def chat_example(ticket_text: str, labels: dict[str, str]) -> dict:
    """One training row in OpenAI chat format."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": ticket_text},
            {"role": "assistant", "content": format_answer(labels)},
        ]
    }


def _draw_unique(rng: random.Random, split: str, n: int, seen: set[str]) -> list[Ticket]:
    """`n` tickets whose texts appear nowhere in `seen` (which they are added to), so no ticket
    repeats within or across splits."""
    tickets: list[Ticket] = []
    attempts = 0
    while len(tickets) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise TuneforgeError(
                f"could not draw {n} distinct {split} tickets after {attempts - 1} tries: the templates "
                f"give too few different texts; ask for fewer {split} tickets"
            )
        ticket = sample_ticket(rng, split)
        if ticket.text not in seen:
            seen.add(ticket.text)
            tickets.append(ticket)
    return tickets


def generate(out_dir, *, n_train: int = 4000, n_valid: int = 200, n_test: int = 300, seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl, validation.jsonl and test.jsonl (OpenAI chat JSONL) into `out_dir`.

    The same seed gives byte-identical files. Each split draws from its own random stream, so the
    size of one split does not reshuffle another.
    """
    out_dir = Path(out_dir)
    sizes = {"train": n_train, "validation": n_valid, "test": n_test}
    seen: set[str] = set()
    paths = {}
    for split in SPLITS:
        rng = random.Random(f"support_triage/{seed}/{split}")
        tickets = _draw_unique(rng, split, sizes[split], seen)
        paths[split] = out_dir / SPLIT_FILES[split]
        with atomic_file(paths[split]) as f:
            for ticket in tickets:
                f.write(json.dumps(chat_example(ticket.text, ticket.labels), ensure_ascii=False) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------
# Scoring


def parse_answer(text: str) -> dict | None:
    """The answer's JSON object, or None when the whole answer (whitespace aside) is not one.

    A chatty answer with JSON inside is not valid: the task asks for JSON only (`score` reports
    such answers apart, as `contains_json`).
    """
    return parse_json_object(text)


def has_valid_labels(answer: dict | None) -> bool:
    """Exactly the three keys, each holding one of its labels."""
    return (
        answer is not None
        and set(answer) == set(FIELDS)
        and all(isinstance(answer[f], str) and answer[f] in LABELS[f] for f in FIELDS)
    )


def score(predictions: list[str], references: list[str]) -> dict:
    """Shares over all tickets: `valid_json` (the whole answer is a JSON object), `contains_json`
    (a JSON object somewhere in it), `valid_labels`, per-field accuracy and `exact` (all three)."""
    generic = json_fields(predictions, references)
    n = generic["n"]
    return {
        "n": n,
        "valid_json": generic["valid_json"],
        "contains_json": generic["contains_json"],
        "valid_labels": sum(has_valid_labels(parse_answer(p)) for p in predictions) / n,
        **{field: generic["fields"].get(field, 0.0) for field in FIELDS},
        "exact": generic["exact"],
    }
