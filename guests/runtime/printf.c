/*
 * A small vsnprintf for GUEST_PRINTF/GUEST_FAIL: %d %i %u %x %X %o %s %c %p %%, flags - 0 + space #,
 * field width and precision (numbers or `*`), lengths hh h l ll z j t. No floating point.
 */
#include "guest.h"

struct out {
	char *buf;
	size_t size;
	size_t len; /* what the full output would need, without the NUL */
};

static void put(struct out *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

static void pad(struct out *o, char c, int n)
{
	while (n-- > 0)
		put(o, c);
}

enum { F_LEFT = 1, F_ZERO = 2, F_PLUS = 4, F_SPACE = 8, F_ALT = 16, F_UPPER = 32, F_SIGNED = 64 };

/* Digits of v in base (8, 10 or 16), least significant first; returns how many. */
static int digits(char *tmp, uint64_t v, unsigned base, bool upper)
{
	const char *hex = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	int n = 0;

	if (base == 16) {
		do {
			tmp[n++] = hex[v & 15];
			v >>= 4;
		} while (v);
	} else if (base == 8) {
		do {
			tmp[n++] = hex[v & 7];
			v >>= 3;
		} while (v);
	} else {
		/* 32-bit divisions while they suffice (no library call on i386 for those) */
		while (v > 0xffffffffu) {
			tmp[n++] = hex[v % 10];
			v /= 10;
		}
		uint32_t w = (uint32_t)v;
		do {
			tmp[n++] = hex[w % 10];
			w /= 10;
		} while (w);
	}
	return n;
}

static void number(struct out *o, uint64_t v, bool negative, unsigned base, int flags, int width,
		   int prec)
{
	char tmp[24]; /* 2^64 in octal: 22 digits */
	const char *prefix = "";
	int n = 0, zeros = 0, len;
	char sign = 0;

	if (negative)
		sign = '-';
	else if ((flags & F_SIGNED) && (flags & F_PLUS))
		sign = '+';
	else if ((flags & F_SIGNED) && (flags & F_SPACE))
		sign = ' ';
	if (flags & F_ALT) {
		if (base == 16 && v)
			prefix = flags & F_UPPER ? "0X" : "0x";
		else if (base == 8)
			prefix = "0";
	}
	if (!(prec == 0 && v == 0))
		n = digits(tmp, v, base, flags & F_UPPER);
	if (prec > n)
		zeros = prec - n;
	if (base == 8 && *prefix && (zeros || (n && tmp[n - 1] == '0')))
		prefix = ""; /* octal alt form: it already starts with a 0 */
	len = (sign ? 1 : 0) + (int)guest_strlen(prefix) + zeros + n;
	if ((flags & F_ZERO) && !(flags & F_LEFT) && prec < 0 && width > len) {
		zeros += width - len;
		len = width;
	}
	if (!(flags & F_LEFT))
		pad(o, ' ', width - len);
	if (sign)
		put(o, sign);
	while (*prefix)
		put(o, *prefix++);
	pad(o, '0', zeros);
	while (n > 0)
		put(o, tmp[--n]);
	if (flags & F_LEFT)
		pad(o, ' ', width - len);
}

enum { L_INT, L_CHAR, L_SHORT, L_LONG, L_LLONG, L_SIZE, L_MAX, L_PTRDIFF };

static uint64_t get_unsigned(va_list *ap, int length)
{
	switch (length) {
	case L_CHAR:
		return (unsigned char)va_arg(*ap, unsigned int);
	case L_SHORT:
		return (unsigned short)va_arg(*ap, unsigned int);
	case L_LONG:
		return va_arg(*ap, unsigned long);
	case L_LLONG:
	case L_MAX:
		return va_arg(*ap, unsigned long long);
	case L_SIZE:
		return va_arg(*ap, size_t);
	case L_PTRDIFF:
		return (uint64_t)va_arg(*ap, ptrdiff_t);
	default:
		return va_arg(*ap, unsigned int);
	}
}

static int64_t get_signed(va_list *ap, int length)
{
	switch (length) {
	case L_CHAR:
		return (signed char)va_arg(*ap, int);
	case L_SHORT:
		return (short)va_arg(*ap, int);
	case L_LONG:
		return va_arg(*ap, long);
	case L_LLONG:
	case L_MAX:
		return va_arg(*ap, long long);
	case L_SIZE:
		return (int64_t)va_arg(*ap, size_t); /* %zd: the signed size_t */
	case L_PTRDIFF:
		return va_arg(*ap, ptrdiff_t);
	default:
		return va_arg(*ap, int);
	}
}

static int parse_int(const char **p)
{
	int v = 0;

	while (**p >= '0' && **p <= '9') {
		if (v < 100000)
			v = v * 10 + (**p - '0');
		(*p)++;
	}
	return v;
}

int guest_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap_in)
{
	struct out o = { buf, size, 0 };
	const char *p = fmt;
	va_list ap;

	va_copy(ap, ap_in);
	while (*p) {
		int flags = 0, width = 0, prec = -1, length = L_INT;
		const char *start = p;

		if (*p != '%') {
			put(&o, *p++);
			continue;
		}
		p++;
		for (;; p++) {
			if (*p == '-')
				flags |= F_LEFT;
			else if (*p == '0')
				flags |= F_ZERO;
			else if (*p == '+')
				flags |= F_PLUS;
			else if (*p == ' ')
				flags |= F_SPACE;
			else if (*p == '#')
				flags |= F_ALT;
			else
				break;
		}
		if (*p == '*') {
			width = va_arg(ap, int);
			if (width < 0) {
				flags |= F_LEFT;
				width = -width;
			}
			p++;
		} else {
			width = parse_int(&p);
		}
		if (*p == '.') {
			p++;
			if (*p == '*') {
				prec = va_arg(ap, int);
				p++;
			} else {
				prec = parse_int(&p);
			}
		}
		switch (*p) {
		case 'h':
			p++;
			length = L_SHORT;
			if (*p == 'h') {
				p++;
				length = L_CHAR;
			}
			break;
		case 'l':
			p++;
			length = L_LONG;
			if (*p == 'l') {
				p++;
				length = L_LLONG;
			}
			break;
		case 'z':
			p++;
			length = L_SIZE;
			break;
		case 'j':
			p++;
			length = L_MAX;
			break;
		case 't':
			p++;
			length = L_PTRDIFF;
			break;
		}
		switch (*p) {
		case 'd':
		case 'i': {
			int64_t v = get_signed(&ap, length);
			uint64_t mag = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;

			number(&o, mag, v < 0, 10, flags | F_SIGNED, width, prec);
			break;
		}
		case 'u':
			number(&o, get_unsigned(&ap, length), false, 10, flags, width, prec);
			break;
		case 'X':
			flags |= F_UPPER;
			/* fall through */
		case 'x':
			number(&o, get_unsigned(&ap, length), false, 16, flags, width, prec);
			break;
		case 'o':
			number(&o, get_unsigned(&ap, length), false, 8, flags, width, prec);
			break;
		case 'p':
			number(&o, (uintptr_t)va_arg(ap, void *), false, 16, flags | F_ALT, width, prec);
			break;
		case 'c': {
			char c = (char)va_arg(ap, int);

			if (!(flags & F_LEFT))
				pad(&o, ' ', width - 1);
			put(&o, c);
			if (flags & F_LEFT)
				pad(&o, ' ', width - 1);
			break;
		}
		case 's': {
			const char *s = va_arg(ap, const char *);
			int n;

			if (!s)
				s = "(null)";
			n = (int)guest_strnlen(s, prec >= 0 ? (size_t)prec : (size_t)-1);
			if (!(flags & F_LEFT))
				pad(&o, ' ', width - n);
			for (int i = 0; i < n; i++)
				put(&o, s[i]);
			if (flags & F_LEFT)
				pad(&o, ' ', width - n);
			break;
		}
		case '%':
			put(&o, '%');
			break;
		default:
			/* unknown conversion (or the string ended): copy the directive as it was */
			while (start < p)
				put(&o, *start++);
			if (*p)
				put(&o, *p);
			else
				continue;
			break;
		}
		p++;
	}
	va_end(ap);
	if (size)
		buf[o.len < size ? o.len : size - 1] = '\0';
	return o.len > 0x7fffffff ? 0x7fffffff : (int)o.len;
}

int guest_snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = guest_vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
