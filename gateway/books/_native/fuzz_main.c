/* A stand-alone stress driver for books.c, for builds with sanitizers (not part of the
 * extension). tests/unit/test_books_native.py compiles and runs it under
 * -fsanitize=address,undefined when gcc can; by hand:
 *   gcc -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all \
 *       gateway/books/_native/books.c gateway/books/_native/fuzz_main.c -o /tmp/nb_fuzz
 *   /tmp/nb_fuzz RECORDS SEED [ORDER_IDS [PRICES]]      e.g. /tmp/nb_fuzz 200000 1 50000 3000
 * Feeds valid-looking MBO streams (few ids, prices and books, every action, F_TOB, UNDEF,
 * order_id 0 as top-of-book venues send it, top-of-book pairs, other rtypes, records with a
 * bad length byte) cut into random chunks, and reads the books back (snapshot, levels,
 * orders) after every chunk. Exits non-zero on an inconsistency. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "books.h"

static uint64_t rng_state;
static uint64_t id_range = 12, px_range = 11;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* one record, or a top-of-book pair (two: the caller leaves room); returns how many */
static int put_mbo(uint8_t *p, uint64_t seq) {
    static const char actions[] = "AAAAAAAAAACCCMMMRTFNX";
    static const char sides[] = "BBAAN";
    uint16_t pub = (uint16_t)(1 + rnd() % 2);
    uint32_t iid = (uint32_t)(1 + rnd() % 3);
    uint64_t ts = seq * 10, oid = rnd() % 8 == 0 ? 0 : 1 + rnd() % id_range;
    int64_t px = (rnd() % 16 == 0) ? INT64_MAX : (int64_t)(95 + rnd() % px_range);
    uint32_t size = (uint32_t)(rnd() % 10);
    if (rnd() % 50 == 0) size = UINT32_MAX - (uint32_t)(rnd() % 3);
    uint8_t flags = (rnd() % (id_range > 1000 ? 5000 : 8) == 0) ? 0xC0 : (rnd() % 4 ? 0x80 : 0);
    memset(p, 0, 56);
    p[0] = 14;
    p[1] = 0xA0;
    memcpy(p + 2, &pub, 2);
    memcpy(p + 4, &iid, 4);
    memcpy(p + 8, &ts, 8);
    memcpy(p + 16, &oid, 8);
    memcpy(p + 24, &px, 8);
    memcpy(p + 32, &size, 4);
    p[36] = flags;
    p[38] = (uint8_t)actions[rnd() % (sizeof actions - 1)];
    if (p[38] == 'R' && id_range > 1000 && rnd() % 500) p[38] = 'A'; /* big books: rare R */
    p[39] = (uint8_t)sides[rnd() % (sizeof sides - 1)];
    memcpy(p + 40, &ts, 8);
    memcpy(p + 52, &seq, 4);
    if ((flags & 0x40) && p[38] == 'A' && rnd() % 2) { /* a top-of-book quote's first half: */
        memcpy(p + 56, p, 56);                          /* the pair, both order_id 0 */
        memset(p + 16, 0, 8);
        memset(p + 56 + 16, 0, 8);
        p[36] = 0x40;
        p[39] = 'B';
        p[56 + 39] = 'A';
        return 2;
    }
    if (rnd() % 200 == 0) p[0] = (uint8_t)(rnd() % 20);     /* a bad length byte */
    if (rnd() % 100 == 0) p[1] = (uint8_t)(rnd() % 256);    /* another rtype */
    return 1;
}

int main(int argc, char **argv) {
    size_t records = argc > 1 ? strtoull(argv[1], NULL, 10) : 100000;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) * 2654435761u + 1 : 88172645463325252ull;
    if (argc > 3) id_range = strtoull(argv[3], NULL, 10) + 1;
    if (argc > 4) px_range = strtoull(argv[4], NULL, 10) + 1;
    nb_engine *e = nb_new();
    if (e == NULL) return 2;
    size_t n = (records + 1) * 56;
    uint8_t *data = malloc(n);
    if (data == NULL) return 2;
    size_t made = 0;
    while (made < records) made += (size_t)put_mbo(data + 56 * made, made);
    n = made * 56; /* a pair may end one record past `records` (room allocated) */
    nb_level_out lv[64];
    nb_order_out *orders = NULL;
    size_t pos = 0;
    while (pos < n) {
        /* whole records mostly; now and then a cut anywhere (the next chunk starts at the
         * next record boundary again) */
        size_t take = rnd() % 20 ? 56 * (1 + rnd() % 40) : 1 + rnd() % 2000;
        if (take > n - pos) take = n - pos;
        /* the chunk in its own allocation, so ASan sees any read past it */
        uint8_t *chunk = malloc(take);
        memcpy(chunk, data + pos, take);
        nb_result res;
        nb_apply(e, chunk, take, (int)(rnd() % 8), &res);
        if (res.consumed > take) return 3;
        if ((res.error == 0) != (res.consumed == take)) return 4;
        if (res.mbp1_len != res.mbp1_count * 80 || res.mbp10_len != res.mbp10_count * 368 ||
            res.trades_len != res.trades_count * 48)
            return 5;
        free(chunk);
        pos += take;
        pos = (pos + 55) / 56 * 56;
        for (uint32_t iid = 1; iid <= 3; iid++) {
            for (uint16_t pub = 1; pub <= 2; pub++) {
                size_t c = nb_order_count(e, iid, pub);
                orders = realloc(orders, (c + 1) * sizeof *orders);
                if (nb_orders(e, iid, pub, orders, c) != c) return 6;
                uint64_t counted = 0; /* level counts leave out top-of-book orders (<= 1 a side) */
                size_t nb = nb_levels(e, iid, pub, 'B', 64, lv);
                for (size_t i = 0; i < nb; i++) counted += lv[i].count;
                for (size_t i = 1; i < nb; i++)
                    if (!(lv[i].price < lv[i - 1].price)) return 7;
                size_t na = nb_levels(e, iid, pub, 'A', 64, lv);
                for (size_t i = 0; i < na; i++) counted += lv[i].count;
                for (size_t i = 1; i < na; i++)
                    if (!(lv[i].price > lv[i - 1].price)) return 8;
                if (nb < 64 && na < 64) { /* the snapshot tells the top-of-book orders */
                    const uint8_t *snap;
                    size_t len;
                    uint64_t count, tob = 0;
                    if (nb_snapshot(e, &iid, 1, 0, 99, &snap, &len, &count) != 0) return 9;
                    for (size_t off = 0; off < len; off += 56)
                        if (memcmp(snap + off + 2, &pub, 2) == 0 && (snap[off + 36] & 0x40))
                            tob++;
                    if (tob > 2 || c != counted + tob) return 11;
                }
            }
        }
        if (rnd() % 16 == 0) {
            const uint8_t *snap;
            size_t len;
            uint64_t count;
            uint32_t want[2] = {(uint32_t)(rnd() % 4), 3};
            if (nb_snapshot(e, want, 2, (int)(rnd() % 2), 99, &snap, &len, &count) != 0) return 9;
            if (len != count * 56) return 10;
            /* a top-of-book order (F_TOB) comes first of its side in its book's records */
            int seen[2] = {0, 0};
            for (size_t off = 0; off < len; off += 56) {
                const uint8_t *r = snap + off;
                if (r[38] == 'R') {
                    seen[0] = seen[1] = 0;
                    continue;
                }
                int sd = r[39] == 'A';
                if ((r[36] & 0x40) && seen[sd]) return 12;
                seen[sd] = 1;
            }
        }
    }
    nb_stats st;
    nb_get_stats(e, &st);
    printf("ok books=%llu orders=%llu levels=%llu applied=%llu memory=%llu\n",
           (unsigned long long)st.books, (unsigned long long)st.orders,
           (unsigned long long)st.levels, (unsigned long long)st.records_applied,
           (unsigned long long)st.memory_bytes);
    free(orders);
    free(data);
    nb_free(e);
    return 0;
}
