/* Native order books (see books.h). Layout:
 * - books: an array, found through an open-addressing map keyed by (instrument_id, publisher_id);
 * - orders: one pool (indices, a free list), found through one open-addressing map keyed by
 *   (book, order_id) with linear probing and backward-shift deletion;
 * - levels: per book and side, an array sorted worst first (the best level is the last entry,
 *   so the busy top of the book moves little memory), binary-searched by price; each level
 *   holds its orders as a doubly linked FIFO (queue priority);
 * - a top-of-book order (an F_TOB add) rests in its level like any order but is not in the
 *   orders map and not in its level's count; it is the head of its level (it rested on an
 *   emptied side) and leaves only when its side is cleared.
 * Every allocation a record may need is made before the record changes anything, so a failed
 * allocation stops the walk with the books still consistent. */
#include "books.h"

#include <stdlib.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "DBN is little-endian: this engine reads and writes records in place"
#endif

#define NIL UINT32_MAX
#define UNDEF_PRICE INT64_MAX
#define F_LAST 0x80
#define F_TOB 0x40
#define F_SNAPSHOT 0x20
#define F_BAD_TS_RECV 0x08
#define RTYPE_MBO 0xA0
#define MBO_LEN 56
#define TRADE_LEN 48
#define MBP1_LEN 80
#define MBP10_LEN 368
#define TOPN 10

typedef struct {
    int64_t price;
    uint64_t total; /* every order's size, a top-of-book order's included */
    uint32_t count; /* orders, a top-of-book order left out */
    uint32_t head, tail, pad;
} Level;

typedef struct {
    Level *lv;
    uint32_t len, cap;
} Side;

typedef struct {
    uint32_t iid;
    uint16_t pub;
    uint16_t pad;
    uint64_t norders;
    Side side[2]; /* 0: bids, 1: asks */
} Book;

typedef struct {
    uint64_t order_id;
    int64_t price;
    uint64_t ts_event;
    uint32_t size, sequence, prev, next, book;
    uint8_t side;
    uint8_t tob; /* an F_TOB add: not in the orders map, not in its level's count */
} Order;

typedef struct {
    uint64_t oid;
    uint32_t book, idx; /* idx NIL: empty slot */
} OSlot;

typedef struct {
    uint64_t key;
    uint32_t idx, pad; /* idx NIL: empty slot */
} BSlot;

typedef struct {
    uint8_t *p;
    size_t len, cap;
    uint64_t count;
} Buf;

struct nb_engine {
    Book *books;
    uint32_t nbooks, books_cap;
    BSlot *bmap;
    uint32_t bmap_cap;
    Order *pool;
    uint32_t pool_n, pool_cap, free_head;
    OSlot *omap;
    size_t omap_cap, omap_count;
    Buf out_mbp1, out_mbp10, out_trades, snap;
    uint64_t mem, orders, levels, applied, unknown_cancels;
    uint64_t last_key;
    uint32_t last_book;
};

typedef struct {
    uint16_t pub;
    uint32_t iid;
    uint64_t ts_event, order_id;
    int64_t price;
    uint32_t size, sequence;
    uint8_t flags;
    char action, side;
} Mbo;

typedef struct {
    int64_t px;
    uint64_t sz;
    uint32_t ct;
} Top;

/* ---- memory ------------------------------------------------------------------------- */

static int xresize(nb_engine *e, void **p, size_t old_bytes, size_t new_bytes) {
    void *q = realloc(*p, new_bytes);
    if (q == NULL) return -1;
    *p = q;
    e->mem += new_bytes;
    e->mem -= old_bytes;
    return 0;
}

static int buf_reserve(nb_engine *e, Buf *b, size_t extra) {
    if (b->cap - b->len >= extra) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < extra) {
        if (cap > SIZE_MAX / 2) return -1;
        cap *= 2;
    }
    if (xresize(e, (void **)&b->p, b->cap, cap) != 0) return -1;
    b->cap = cap;
    return 0;
}

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static inline uint64_t ohash(uint32_t book, uint64_t oid) {
    return mix64(oid ^ ((uint64_t)book * 0x9E3779B97F4A7C15ULL));
}

/* ---- books map ---------------------------------------------------------------------- */

static inline uint64_t book_key(uint32_t iid, uint16_t pub) { return ((uint64_t)iid << 16) | pub; }

static uint32_t book_find(const nb_engine *e, uint64_t key) {
    if (e->bmap_cap == 0) return NIL;
    uint32_t mask = e->bmap_cap - 1;
    for (uint32_t i = (uint32_t)mix64(key) & mask;; i = (i + 1) & mask) {
        if (e->bmap[i].idx == NIL) return NIL;
        if (e->bmap[i].key == key) return e->bmap[i].idx;
    }
}

static void bmap_put(nb_engine *e, uint64_t key, uint32_t idx) {
    uint32_t mask = e->bmap_cap - 1;
    uint32_t i = (uint32_t)mix64(key) & mask;
    while (e->bmap[i].idx != NIL) i = (i + 1) & mask;
    e->bmap[i].key = key;
    e->bmap[i].idx = idx;
}

static uint32_t book_get(nb_engine *e, uint32_t iid, uint16_t pub) {
    uint64_t key = book_key(iid, pub);
    if (e->nbooks && e->last_key == key) return e->last_book;
    uint32_t bi = book_find(e, key);
    if (bi == NIL) {
        if (e->nbooks >= 0x7fffffffu) return NIL;
        if (e->nbooks == e->books_cap) {
            uint32_t cap = e->books_cap ? e->books_cap * 2 : 64;
            if (xresize(e, (void **)&e->books, (size_t)e->books_cap * sizeof(Book),
                        (size_t)cap * sizeof(Book)) != 0)
                return NIL;
            e->books_cap = cap;
        }
        if ((uint64_t)(e->nbooks + 1) * 2 > e->bmap_cap) {
            uint32_t cap = e->bmap_cap ? e->bmap_cap * 2 : 128;
            BSlot *old = e->bmap;
            uint32_t old_cap = e->bmap_cap;
            BSlot *nm = malloc((size_t)cap * sizeof(BSlot));
            if (nm == NULL) return NIL;
            for (uint32_t i = 0; i < cap; i++) nm[i].idx = NIL;
            e->bmap = nm;
            e->bmap_cap = cap;
            for (uint32_t i = 0; i < old_cap; i++)
                if (old[i].idx != NIL) bmap_put(e, old[i].key, old[i].idx);
            free(old);
            e->mem += (size_t)cap * sizeof(BSlot);
            e->mem -= (size_t)old_cap * sizeof(BSlot);
        }
        bi = e->nbooks++;
        Book *b = &e->books[bi];
        memset(b, 0, sizeof *b);
        b->iid = iid;
        b->pub = pub;
        bmap_put(e, key, bi);
    }
    e->last_key = key;
    e->last_book = bi;
    return bi;
}

/* ---- orders map ---------------------------------------------------------------------- */

static size_t omap_find(const nb_engine *e, uint32_t book, uint64_t oid) {
    if (e->omap_cap == 0) return SIZE_MAX;
    size_t mask = e->omap_cap - 1;
    for (size_t i = ohash(book, oid) & mask;; i = (i + 1) & mask) {
        const OSlot *s = &e->omap[i];
        if (s->idx == NIL) return SIZE_MAX;
        if (s->oid == oid && s->book == book) return i;
    }
}

static void omap_put(nb_engine *e, uint32_t book, uint64_t oid, uint32_t idx) {
    size_t mask = e->omap_cap - 1;
    size_t i = ohash(book, oid) & mask;
    while (e->omap[i].idx != NIL) i = (i + 1) & mask;
    e->omap[i].oid = oid;
    e->omap[i].book = book;
    e->omap[i].idx = idx;
    e->omap_count++;
}

static void omap_del(nb_engine *e, size_t i) {
    size_t mask = e->omap_cap - 1;
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (e->omap[j].idx == NIL) break;
        size_t k = ohash(e->omap[j].book, e->omap[j].oid) & mask;
        int in_range = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
        if (!in_range) {
            e->omap[i] = e->omap[j];
            i = j;
        }
    }
    e->omap[i].idx = NIL;
    e->omap_count--;
}

static int omap_reserve(nb_engine *e) {
    if ((e->omap_count + 1) * 2 <= e->omap_cap) return 0;
    size_t cap = e->omap_cap ? e->omap_cap * 2 : 1024;
    if (cap > SIZE_MAX / sizeof(OSlot)) return -1;
    OSlot *old = e->omap;
    size_t old_cap = e->omap_cap;
    OSlot *nm = malloc(cap * sizeof(OSlot));
    if (nm == NULL) return -1;
    for (size_t i = 0; i < cap; i++) nm[i].idx = NIL;
    e->omap = nm;
    e->omap_cap = cap;
    e->omap_count = 0;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i].idx != NIL) omap_put(e, old[i].book, old[i].oid, old[i].idx);
    free(old);
    e->mem += cap * sizeof(OSlot);
    e->mem -= old_cap * sizeof(OSlot);
    return 0;
}

static int pool_reserve(nb_engine *e) {
    if (e->free_head != NIL || e->pool_n < e->pool_cap) return 0;
    if (e->pool_cap >= 0x40000000u) return -1;
    uint32_t cap = e->pool_cap ? e->pool_cap * 2 : 1024;
    if (xresize(e, (void **)&e->pool, (size_t)e->pool_cap * sizeof(Order),
                (size_t)cap * sizeof(Order)) != 0)
        return -1;
    e->pool_cap = cap;
    return 0;
}

static uint32_t order_alloc(nb_engine *e) {
    if (e->free_head != NIL) {
        uint32_t oi = e->free_head;
        e->free_head = e->pool[oi].next;
        return oi;
    }
    return e->pool_n++;
}

static void order_free(nb_engine *e, uint32_t oi) {
    e->pool[oi].next = e->free_head;
    e->free_head = oi;
}

/* ---- levels ------------------------------------------------------------------------- */

static int side_reserve(nb_engine *e, Side *s) {
    if (s->len < s->cap) return 0;
    if (s->cap >= 0x40000000u) return -1;
    uint32_t cap = s->cap ? s->cap * 2 : 16;
    if (xresize(e, (void **)&s->lv, (size_t)s->cap * sizeof(Level), (size_t)cap * sizeof(Level)) != 0)
        return -1;
    s->cap = cap;
    return 0;
}

static inline int side_index(char c) { return c == 'B' ? 0 : c == 'A' ? 1 : -1; }

/* first index whose price is not worse than px (bids ascend, asks descend) */
static inline uint32_t lv_lb(const Side *s, int ask, int64_t px) {
    uint32_t lo = 0, hi = s->len;
    if (hi && s->lv[hi - 1].price == px) return hi - 1; /* the top: the common case */
    while (lo < hi) {
        uint32_t mid = (lo + hi) >> 1;
        int64_t p = s->lv[mid].price;
        if (ask ? (p > px) : (p < px))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* levels strictly better than px on this side (0-based rank of px) */
static uint32_t lv_rank(const Side *s, int ask, int64_t px) {
    uint32_t lb = lv_lb(s, ask, px);
    int found = lb < s->len && s->lv[lb].price == px;
    return s->len - lb - (uint32_t)found;
}

static void rest(nb_engine *e, uint32_t bi, int side, uint64_t oid, int64_t px, uint32_t size,
                 uint64_t ts, uint32_t seq, int tob) {
    Book *b = &e->books[bi];
    Side *s = &b->side[side];
    uint32_t li = lv_lb(s, side, px);
    if (!(li < s->len && s->lv[li].price == px)) {
        memmove(&s->lv[li + 1], &s->lv[li], (size_t)(s->len - li) * sizeof(Level));
        s->len++;
        Level *n = &s->lv[li];
        n->price = px;
        n->total = 0;
        n->count = 0;
        n->head = n->tail = NIL;
        e->levels++;
    }
    Level *L = &s->lv[li];
    uint32_t oi = order_alloc(e);
    Order *o = &e->pool[oi];
    o->order_id = oid;
    o->price = px;
    o->ts_event = ts;
    o->size = size;
    o->sequence = seq;
    o->book = bi;
    o->side = (uint8_t)side;
    o->tob = (uint8_t)tob;
    o->prev = L->tail;
    o->next = NIL;
    if (L->tail != NIL)
        e->pool[L->tail].next = oi;
    else
        L->head = oi;
    L->tail = oi;
    L->total += size;
    if (!tob) {
        L->count++;
        omap_put(e, bi, oid, oi);
    }
    b->norders++;
    e->orders++;
}

/* takes a (regular) order out of its level (and the level out of the side when it empties) */
static void unlink_order(nb_engine *e, Book *b, uint32_t oi) {
    Order *o = &e->pool[oi];
    Side *s = &b->side[o->side];
    uint32_t li = lv_lb(s, o->side, o->price);
    Level *L = &s->lv[li];
    L->total -= o->size;
    L->count--;
    if (o->prev != NIL)
        e->pool[o->prev].next = o->next;
    else
        L->head = o->next;
    if (o->next != NIL)
        e->pool[o->next].prev = o->prev;
    else
        L->tail = o->prev;
    if (L->head == NIL) {
        memmove(&s->lv[li], &s->lv[li + 1], (size_t)(s->len - li - 1) * sizeof(Level));
        s->len--;
        e->levels--;
    }
}

static void remove_order(nb_engine *e, uint32_t bi, size_t slot) {
    uint32_t oi = e->omap[slot].idx;
    Book *b = &e->books[bi];
    unlink_order(e, b, oi);
    omap_del(e, slot);
    order_free(e, oi);
    b->norders--;
    e->orders--;
}

static void clear_side(nb_engine *e, uint32_t bi, int side) {
    Book *b = &e->books[bi];
    Side *s = &b->side[side];
    for (uint32_t li = 0; li < s->len; li++) {
        uint32_t oi = s->lv[li].head;
        while (oi != NIL) {
            uint32_t next = e->pool[oi].next;
            if (!e->pool[oi].tob) {
                size_t slot = omap_find(e, bi, e->pool[oi].order_id);
                if (slot != SIZE_MAX) omap_del(e, slot);
            }
            order_free(e, oi);
            b->norders--;
            e->orders--;
            oi = next;
        }
    }
    e->levels -= s->len;
    s->len = 0;
    if (s->cap > 64) { /* a big side emptied: give most of its memory back, keeping room
                          * for the add an F_TOB record makes right after clearing it */
        if (xresize(e, (void **)&s->lv, (size_t)s->cap * sizeof(Level), 16 * sizeof(Level)) == 0)
            s->cap = 16;
    }
}

/* ---- the rules (gateway/books/reference.py) -------------------------------------------- */

static void do_add(nb_engine *e, uint32_t bi, const Mbo *m) {
    int s = side_index(m->side);
    if (m->flags & F_TOB) { /* the side's new top of book, not indexed by its order_id */
        if (s < 0) return;
        clear_side(e, bi, s);
        if (m->price != UNDEF_PRICE && m->size != 0)
            rest(e, bi, s, m->order_id, m->price, m->size, m->ts_event, m->sequence, 1);
        return;
    }
    size_t slot = omap_find(e, bi, m->order_id);
    if (slot != SIZE_MAX) { /* an id that rests already (either side) moves */
        remove_order(e, bi, slot);
    }
    if (m->size > 0 && s >= 0) {
        rest(e, bi, s, m->order_id, m->price, m->size, m->ts_event, m->sequence, 0);
    }
}

static void do_cancel(nb_engine *e, uint32_t bi, const Mbo *m) {
    size_t slot = omap_find(e, bi, m->order_id);
    if (slot == SIZE_MAX) {
        e->unknown_cancels++;
        return;
    }
    Order *o = &e->pool[e->omap[slot].idx];
    if (m->size >= o->size) {
        remove_order(e, bi, slot);
    } else if (m->size > 0) {
        Side *s = &e->books[bi].side[o->side];
        s->lv[lv_lb(s, o->side, o->price)].total -= m->size;
        o->size -= m->size; /* keeps its place */
    }
}

static void do_modify(nb_engine *e, uint32_t bi, const Mbo *m) {
    size_t slot = omap_find(e, bi, m->order_id);
    if (slot == SIZE_MAX) {
        do_add(e, bi, m);
        return;
    }
    Order *o = &e->pool[e->omap[slot].idx];
    int s = side_index(m->side);
    if (m->size == 0) {
        remove_order(e, bi, slot);
    } else if (m->price != o->price || s != (int)o->side || m->size > o->size) {
        remove_order(e, bi, slot);
        if (s >= 0) {
            rest(e, bi, s, m->order_id, m->price, m->size, m->ts_event, m->sequence, 0);
        }
    } else if (m->size < o->size) { /* a decrease keeps queue priority */
        Side *sd = &e->books[bi].side[o->side];
        sd->lv[lv_lb(sd, o->side, o->price)].total -= o->size - m->size;
        o->size = m->size;
    }
}

/* ---- derived records ------------------------------------------------------------------ */

static void save_top(const Book *b, int k, Top top[2][TOPN], uint32_t toplen[2]) {
    for (int sd = 0; sd < 2; sd++) {
        const Side *s = &b->side[sd];
        uint32_t n = s->len < (uint32_t)k ? s->len : (uint32_t)k;
        for (uint32_t i = 0; i < n; i++) {
            const Level *L = &s->lv[s->len - 1 - i];
            top[sd][i].px = L->price;
            top[sd][i].sz = L->total;
            top[sd][i].ct = L->count;
        }
        toplen[sd] = n;
    }
}

static int top_changed(const Book *b, int sd, uint32_t k, const Top *top, uint32_t toplen) {
    const Side *s = &b->side[sd];
    uint32_t n = s->len < k ? s->len : k;
    uint32_t before = toplen < k ? toplen : k;
    if (n != before) return 1;
    for (uint32_t i = 0; i < n; i++) {
        const Level *L = &s->lv[s->len - 1 - i];
        if (L->price != top[i].px || L->total != top[i].sz || L->count != top[i].ct) return 1;
    }
    return 0;
}

/* depth: the 0-based rank (levels strictly better) of the price the record touched; for an
 * add or modify, the better-ranked of the resting order's old place and the record's own
 * price (its side; an invalid side ranks 0); for a cancel, the order's place; R, T and F_TOB
 * adds/modifies: 0. A rank is the same before and after the record (a record touching one
 * price cannot change which prices are better), so all are ranked in the book after it. */
static uint8_t depth_of(const Book *b, const Mbo *m, int old_side, int64_t old_px) {
    char a = m->action;
    uint32_t d = UINT32_MAX;
    if (a == 'C' || ((a == 'A' || a == 'M') && !(m->flags & F_TOB))) {
        if (old_side >= 0) d = lv_rank(&b->side[old_side], old_side, old_px);
        if (a != 'C') {
            int s = side_index(m->side);
            uint32_t r = s < 0 ? 0 : lv_rank(&b->side[s], s, m->price);
            if (r < d) d = r;
        }
    }
    if (d == UINT32_MAX) return 0;
    return d > 255 ? 255 : (uint8_t)d;
}

static inline uint32_t sat32(uint64_t v) { return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v; }

/* the 48 bytes trades and mbp records share: header and fields copied from the MBO record */
static void put_common(uint8_t *p, const uint8_t *rec, uint8_t words, uint8_t rtype, char side,
                       uint8_t depth) {
    p[0] = words;
    p[1] = rtype;
    memcpy(p + 2, rec + 2, 14);  /* publisher_id, instrument_id, ts_event */
    memcpy(p + 16, rec + 24, 8); /* price */
    memcpy(p + 24, rec + 32, 4); /* size */
    p[28] = rec[38];             /* action */
    p[29] = (uint8_t)side;
    p[30] = rec[36]; /* flags */
    p[31] = depth;
    memcpy(p + 32, rec + 40, 8); /* ts_recv */
    memcpy(p + 40, rec + 48, 4); /* ts_in_delta */
    memcpy(p + 44, rec + 52, 4); /* sequence */
}

static void put_mbp(Buf *out, const uint8_t *rec, const Book *b, uint32_t k, char side,
                    uint8_t depth) {
    size_t len = 48 + 32 * (size_t)k;
    uint8_t *p = out->p + out->len;
    put_common(p, rec, (uint8_t)(len / 4), k == 1 ? 0x01 : 0x0A, side, depth);
    for (uint32_t i = 0; i < k; i++) {
        uint8_t *q = p + 48 + 32 * (size_t)i;
        int64_t px[2] = {UNDEF_PRICE, UNDEF_PRICE};
        uint32_t sz[2] = {0, 0}, ct[2] = {0, 0};
        for (int sd = 0; sd < 2; sd++) {
            const Side *s = &b->side[sd];
            if (i < s->len) {
                const Level *L = &s->lv[s->len - 1 - i];
                px[sd] = L->price;
                sz[sd] = sat32(L->total);
                ct[sd] = L->count;
            }
        }
        memcpy(q, &px[0], 8);
        memcpy(q + 8, &px[1], 8);
        memcpy(q + 16, &sz[0], 4);
        memcpy(q + 20, &sz[1], 4);
        memcpy(q + 24, &ct[0], 4);
        memcpy(q + 28, &ct[1], 4);
    }
    out->len += len;
    out->count++;
}

/* ---- the walk ------------------------------------------------------------------------- */

static inline void parse(const uint8_t *r, Mbo *m) {
    memcpy(&m->pub, r + 2, 2);
    memcpy(&m->iid, r + 4, 4);
    memcpy(&m->ts_event, r + 8, 8);
    memcpy(&m->order_id, r + 16, 8);
    memcpy(&m->price, r + 24, 8);
    memcpy(&m->size, r + 32, 4);
    m->flags = r[36];
    m->action = (char)r[38];
    m->side = (char)r[39];
    memcpy(&m->sequence, r + 52, 4);
}

nb_engine *nb_new(void) {
    nb_engine *e = calloc(1, sizeof *e);
    if (e == NULL) return NULL;
    e->free_head = NIL;
    e->mem = sizeof *e;
    return e;
}

void nb_free(nb_engine *e) {
    if (e == NULL) return;
    for (uint32_t i = 0; i < e->nbooks; i++) {
        free(e->books[i].side[0].lv);
        free(e->books[i].side[1].lv);
    }
    free(e->books);
    free(e->bmap);
    free(e->pool);
    free(e->omap);
    free(e->out_mbp1.p);
    free(e->out_mbp10.p);
    free(e->out_trades.p);
    free(e->snap.p);
    free(e);
}

int nb_apply(nb_engine *e, const uint8_t *data, size_t n, int want, nb_result *res) {
    size_t pos = 0;
    int err = NB_OK;
    int mbp = want & (NB_WANT_MBP1 | NB_WANT_MBP10);
    int k = (want & NB_WANT_MBP10) ? TOPN : 1;
    Top top[2][TOPN];
    uint32_t toplen[2];
    e->out_mbp1.len = e->out_mbp10.len = e->out_trades.len = 0;
    e->out_mbp1.count = e->out_mbp10.count = e->out_trades.count = 0;
    while (pos < n) {
        size_t len = (size_t)data[pos] * 4;
        if (len < 16) {
            err = NB_ERR_SHORT;
            break;
        }
        if (len > n - pos) {
            err = NB_ERR_OVERRUN;
            break;
        }
        const uint8_t *rec = data + pos;
        if (rec[1] != RTYPE_MBO || len != MBO_LEN) {
            pos += len;
            continue;
        }
        Mbo m;
        parse(rec, &m);
        /* everything this record may allocate, before it changes anything */
        uint32_t bi = book_get(e, m.iid, m.pub);
        if (bi == NIL || pool_reserve(e) != 0 || omap_reserve(e) != 0 ||
            side_reserve(e, &e->books[bi].side[0]) != 0 ||
            side_reserve(e, &e->books[bi].side[1]) != 0 ||
            ((want & NB_WANT_MBP1) && buf_reserve(e, &e->out_mbp1, MBP1_LEN) != 0) ||
            ((want & NB_WANT_MBP10) && buf_reserve(e, &e->out_mbp10, MBP10_LEN) != 0) ||
            ((want & NB_WANT_TRADES) && buf_reserve(e, &e->out_trades, TRADE_LEN) != 0)) {
            err = NB_ERR_NOMEM;
            break;
        }
        char a = m.action;
        int changes = a == 'A' || a == 'C' || a == 'M' || a == 'R';
        int old_side = -1;
        int64_t old_px = 0;
        if (mbp && changes) {
            save_top(&e->books[bi], k, top, toplen);
            if (a != 'R') {
                size_t slot = omap_find(e, bi, m.order_id);
                if (slot != SIZE_MAX) {
                    old_side = e->pool[e->omap[slot].idx].side;
                    old_px = e->pool[e->omap[slot].idx].price;
                }
            }
        }
        switch (a) {
            case 'A': do_add(e, bi, &m); break;
            case 'C': do_cancel(e, bi, &m); break;
            case 'M': do_modify(e, bi, &m); break;
            case 'R':
                clear_side(e, bi, 0);
                clear_side(e, bi, 1);
                break;
            default: break; /* T, F, N and anything else: no change */
        }
        e->applied++;
        const Book *b = &e->books[bi];
        if (a == 'T') {
            if (want & NB_WANT_TRADES) {
                put_common(e->out_trades.p + e->out_trades.len, rec, TRADE_LEN / 4, 0x00, m.side,
                           0);
                e->out_trades.len += TRADE_LEN;
                e->out_trades.count++;
            }
            if (want & NB_WANT_MBP1) put_mbp(&e->out_mbp1, rec, b, 1, m.side, 0);
            if (want & NB_WANT_MBP10) put_mbp(&e->out_mbp10, rec, b, TOPN, m.side, 0);
        } else if (mbp && changes) {
            for (int which = 0; which < 2; which++) {
                uint32_t kk = which == 0 ? 1 : TOPN;
                if (!(want & (which == 0 ? NB_WANT_MBP1 : NB_WANT_MBP10))) continue;
                int cb = top_changed(b, 0, kk, top[0], toplen[0]);
                int ca = top_changed(b, 1, kk, top[1], toplen[1]);
                if (!cb && !ca) continue;
                char side = (a == 'R' || (cb && ca)) ? 'N' : m.side;
                put_mbp(which == 0 ? &e->out_mbp1 : &e->out_mbp10, rec, b, kk, side,
                        depth_of(b, &m, old_side, old_px));
            }
        }
        pos += len;
    }
    res->mbp1 = e->out_mbp1.p;
    res->mbp1_len = e->out_mbp1.len;
    res->mbp1_count = e->out_mbp1.count;
    res->mbp10 = e->out_mbp10.p;
    res->mbp10_len = e->out_mbp10.len;
    res->mbp10_count = e->out_mbp10.count;
    res->trades = e->out_trades.p;
    res->trades_len = e->out_trades.len;
    res->trades_count = e->out_trades.count;
    res->consumed = pos;
    res->error = err;
    return err;
}

/* ---- snapshot and reading ---------------------------------------------------------------- */

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

typedef struct {
    uint64_t key;
    uint32_t idx;
} KeyIdx;

static int cmp_keyidx(const void *a, const void *b) {
    uint64_t x = ((const KeyIdx *)a)->key, y = ((const KeyIdx *)b)->key;
    return x < y ? -1 : x > y;
}

/* the side's top-of-book order, NIL when none: the head of its level (it rested on an emptied
 * side), most often the best level, so the walk starts there */
static uint32_t side_tob(const nb_engine *e, const Side *s) {
    for (uint32_t li = s->len; li-- > 0;) {
        uint32_t h = s->lv[li].head;
        if (h != NIL && e->pool[h].tob) return h;
    }
    return NIL;
}

static void put_snap(uint8_t *p, const Book *b, uint64_t ts_event, uint64_t oid, int64_t px,
                     uint32_t size, uint8_t flags, char action, char side, uint64_t ts_recv,
                     uint32_t seq) {
    memset(p, 0, MBO_LEN);
    p[0] = MBO_LEN / 4;
    p[1] = RTYPE_MBO;
    memcpy(p + 2, &b->pub, 2);
    memcpy(p + 4, &b->iid, 4);
    memcpy(p + 8, &ts_event, 8);
    memcpy(p + 16, &oid, 8);
    memcpy(p + 24, &px, 8);
    memcpy(p + 32, &size, 4);
    p[36] = flags;
    p[38] = (uint8_t)action;
    p[39] = (uint8_t)side;
    memcpy(p + 40, &ts_recv, 8);
    memcpy(p + 52, &seq, 4);
}

/* one resting order as a snapshot's add (F_TOB for a top-of-book order, F_LAST on the book's
 * last record); the buffer has room */
static void snap_order(nb_engine *e, const Book *b, uint32_t oi, int sd, uint64_t ts_recv,
                       uint64_t *left) {
    const Order *o = &e->pool[oi];
    uint8_t flags = F_SNAPSHOT | F_BAD_TS_RECV | (o->tob ? F_TOB : 0) | (--*left ? 0 : F_LAST);
    put_snap(e->snap.p + e->snap.len, b, o->ts_event, o->order_id, o->price, o->size, flags, 'A',
             sd ? 'A' : 'B', ts_recv, o->sequence);
    e->snap.len += MBO_LEN;
}

int nb_snapshot(nb_engine *e, const uint32_t *iids, size_t n_iids, int all, uint64_t ts_recv,
                const uint8_t **out, size_t *out_len, uint64_t *count) {
    *out = NULL;
    *out_len = 0;
    *count = 0;
    if (e->nbooks == 0) return 0;
    KeyIdx *sel = malloc((size_t)e->nbooks * sizeof(KeyIdx));
    uint32_t *want = NULL;
    if (sel == NULL) return NB_ERR_NOMEM;
    if (!all && n_iids) {
        want = malloc(n_iids * sizeof(uint32_t));
        if (want == NULL) {
            free(sel);
            return NB_ERR_NOMEM;
        }
        memcpy(want, iids, n_iids * sizeof(uint32_t));
        qsort(want, n_iids, sizeof(uint32_t), cmp_u32);
    }
    uint32_t nsel = 0;
    size_t records = 0;
    for (uint32_t i = 0; i < e->nbooks; i++) {
        if (!all && (want == NULL || bsearch(&e->books[i].iid, want, n_iids, sizeof(uint32_t),
                                             cmp_u32) == NULL))
            continue;
        sel[nsel].key = book_key(e->books[i].iid, e->books[i].pub);
        sel[nsel++].idx = i;
        records += 1 + e->books[i].norders;
    }
    free(want);
    qsort(sel, nsel, sizeof(KeyIdx), cmp_keyidx);
    e->snap.len = 0;
    if (records && buf_reserve(e, &e->snap, records * MBO_LEN) != 0) {
        free(sel);
        return NB_ERR_NOMEM;
    }
    const uint8_t base = F_SNAPSHOT | F_BAD_TS_RECV;
    for (uint32_t j = 0; j < nsel; j++) {
        const Book *b = &e->books[sel[j].idx];
        uint8_t *p = e->snap.p + e->snap.len;
        put_snap(p, b, ts_recv, 0, UNDEF_PRICE, 0, base | (b->norders ? 0 : F_LAST), 'R', 'N',
                 ts_recv, 0);
        e->snap.len += MBO_LEN;
        uint64_t left = b->norders;
        for (int sd = 0; sd < 2; sd++) {
            /* the side's top-of-book order first (flagged F_TOB, it replaces the side on
             * replay), then the other orders best level first, each level in queue priority */
            const Side *s = &b->side[sd];
            uint32_t tob = side_tob(e, s);
            if (tob != NIL) snap_order(e, b, tob, sd, ts_recv, &left);
            for (uint32_t li = s->len; li-- > 0;)
                for (uint32_t oi = s->lv[li].head; oi != NIL; oi = e->pool[oi].next)
                    if (!e->pool[oi].tob) snap_order(e, b, oi, sd, ts_recv, &left);
        }
    }
    free(sel);
    *out = e->snap.p;
    *out_len = e->snap.len;
    *count = records;
    return 0;
}

void nb_get_stats(const nb_engine *e, nb_stats *out) {
    out->books = e->nbooks;
    out->orders = e->orders;
    out->levels = e->levels;
    out->memory_bytes = e->mem;
    out->records_applied = e->applied;
    out->unknown_cancels = e->unknown_cancels;
}

size_t nb_levels(const nb_engine *e, uint32_t iid, uint16_t pub, char side, size_t depth,
                 nb_level_out *out) {
    uint32_t bi = book_find(e, book_key(iid, pub));
    int sd = side_index(side);
    if (bi == NIL || sd < 0) return 0;
    const Side *s = &e->books[bi].side[sd];
    size_t n = s->len < depth ? s->len : depth;
    for (size_t i = 0; i < n; i++) {
        const Level *L = &s->lv[s->len - 1 - i];
        out[i].price = L->price;
        out[i].size = L->total;
        out[i].count = L->count;
    }
    return n;
}

size_t nb_order_count(const nb_engine *e, uint32_t iid, uint16_t pub) {
    uint32_t bi = book_find(e, book_key(iid, pub));
    return bi == NIL ? 0 : (size_t)e->books[bi].norders;
}

static void put_order_out(nb_order_out *out, const Order *o, int sd) {
    out->order_id = o->order_id;
    out->price = o->price;
    out->ts_event = o->ts_event;
    out->size = o->size;
    out->sequence = o->sequence;
    out->side = sd ? 'A' : 'B';
}

size_t nb_orders(const nb_engine *e, uint32_t iid, uint16_t pub, nb_order_out *out, size_t cap) {
    uint32_t bi = book_find(e, book_key(iid, pub));
    if (bi == NIL) return 0;
    size_t n = 0;
    for (int sd = 0; sd < 2; sd++) {
        const Side *s = &e->books[bi].side[sd];
        uint32_t tob = side_tob(e, s); /* first, as in a snapshot */
        if (tob != NIL && n < cap) put_order_out(&out[n++], &e->pool[tob], sd);
        for (uint32_t li = s->len; li-- > 0;)
            for (uint32_t oi = s->lv[li].head; oi != NIL && n < cap; oi = e->pool[oi].next)
                if (!e->pool[oi].tob) put_order_out(&out[n++], &e->pool[oi], sd);
    }
    return n;
}
