/* What the C unit tests share: a failure count and CHECK, which counts a failed condition. */
#ifndef KCORE_TESTS_CHECK_H
#define KCORE_TESTS_CHECK_H

#include <stdio.h>

static int failures;

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                  \
            failures++;                                                      \
        }                                                                    \
    } while (0)

/* main's return: 1 with the count of failed checks, else 0 with "NAME tests: all passed". */
static int check_report(const char *name)
{
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("%s tests: all passed\n", name);
    return 0;
}

#endif
